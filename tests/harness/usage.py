"""What a usage report should say about the standard scenario, tallied by hand."""

from __future__ import annotations

from collections.abc import Callable

from tests.harness.images import Scenario
from tests.harness.registry import Registry


def expected_usage(
    registry: Registry, scenario: Scenario, size_of: Callable[[str], int] | None = None
) -> dict[str, dict[str, int]]:
    """Tally the scenario's live images by hand: blob sizes from ``size_of(hex)``, by default
    read from the store's files."""
    refs: dict[str, set[str]] = {}
    for image in scenario.images:
        if image.deleted:
            continue
        named = refs.setdefault(image.repository, set())
        named.add(image.digest)
        named.update(image.manifest.references)
    owners: dict[str, set[str]] = {}
    for repo, digests in refs.items():
        for digest in digests:
            owners.setdefault(digest, set()).add(repo)

    def size(digest: str) -> int:
        hexdigest = digest.split(":", 1)[1]
        if size_of is not None:
            return size_of(hexdigest)
        blob = registry.root / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest
        return (blob / "data").stat().st_size

    out = {}
    for repo, digests in refs.items():
        exclusive = sum(size(d) for d in digests if len(owners[d]) == 1)
        shared = sum(size(d) for d in digests if len(owners[d]) > 1)
        out[repo] = {
            "blobs": len(digests),
            "bytes": exclusive + shared,
            "exclusive_bytes": exclusive,
            "shared_bytes": shared,
        }
    return out
