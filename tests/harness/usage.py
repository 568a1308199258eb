"""What a usage report should say about a scenario, tallied by hand."""

from __future__ import annotations

from collections.abc import Callable

from tests.harness.images import Scenario
from tests.harness.registry import Registry


def file_size(registry: Registry) -> Callable[[str], int]:
    """A blob's size (by hex digest) read from a filesystem store's data file."""

    def size(hexdigest: str) -> int:
        blob = registry.root / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest
        return (blob / "data").stat().st_size

    return size


def tally(refs: dict[str, set[str]], size_of: Callable[[str], int]) -> dict[str, dict[str, int]]:
    """Per repository: blobs, bytes, exclusive and shared bytes, from what each references."""
    owners: dict[str, set[str]] = {}
    for repo, digests in refs.items():
        for digest in digests:
            owners.setdefault(digest, set()).add(repo)

    def size(digest: str) -> int:
        return size_of(digest.split(":", 1)[1])

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


def expected_usage(
    registry: Registry, scenario: Scenario, size_of: Callable[[str], int] | None = None
) -> dict[str, dict[str, int]]:
    """The standard scenario's live images by repository; sizes from ``size_of(hex)``, by
    default read from the store's files."""
    refs: dict[str, set[str]] = {}
    for image in scenario.images:
        if image.deleted:
            continue
        named = refs.setdefault(image.repository, set())
        named.add(image.digest)
        named.update(image.manifest.references)
    return tally(refs, size_of or file_size(registry))
