"""What the store holds, straight from the repositories walk and the blob listing
(the original binary's ``-list-repositories``, ``-list-manifests[-from]``, ``-list-blobs``)."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator

from daemon import layout
from daemon.config import Settings
from daemon.inventory import Inventory
from daemon.storage import open_storage
from daemon.storage.base import Storage, StorageError
from daemon.verify import chunked, in_parallel, tag_link

LISTINGS = ("repositories", "manifests", "blobs")
Row = dict[str, object]


class NoRepository(LookupError):
    """The repository asked for is not in the store."""


async def _inventory(storage: Storage, repository: str | None) -> Inventory:
    inventory = Inventory(keep_layers=False)
    if repository is None:
        async for batch in storage.scan_repositories(layers=False):
            inventory.add_keys(batch)
        return inventory
    if not layout.is_repository_name(repository):
        raise NoRepository(f"{repository[:100]!r} is not a repository name")
    async for entries in storage.walk(layout.repository_root(repository) + "_manifests/"):
        inventory.add_keys([entry.key for entry in entries])
    if repository not in inventory.repositories:
        raise NoRepository(f"no repository {repository!r} in the store")
    return inventory


async def repositories(storage: Storage) -> AsyncIterator[Row]:
    """One row a repository: its name, how many tags and revision links it has."""
    inventory = await _inventory(storage, None)
    for name in sorted(inventory.repositories):
        repo = inventory.repositories[name]
        yield {"repository": name, "tags": len(repo.tags), "manifests": len(repo.revisions)}


async def manifests(storage: Storage, repository: str | None = None) -> AsyncIterator[Row]:
    """One row a manifest revision (and a tag naming a manifest without one): its tags."""
    inventory = await _inventory(storage, repository)
    for name in sorted(inventory.repositories):
        repo = inventory.repositories[name]
        revisions = sorted(repo.revisions)
        tags = sorted(repo.tags)

        async def links(keys: list[str]) -> list[bytes | ValueError | None]:
            return await storage.read_parsed(keys, 1024, layout.link_digest)

        found_revisions = [
            r
            for part in await in_parallel(
                chunked([layout.revision_dir(name, h) + "link" for h in revisions]),
                links,
                storage.concurrency,
            )
            for r in part
        ]
        found_tags = [
            r
            for part in await in_parallel(
                chunked([tag_link(name, t) for t in tags]), links, storage.concurrency
            )
            for r in part
        ]
        tagged: dict[str, list[str]] = {}
        for tag, raw in zip(tags, found_tags, strict=True):
            if isinstance(raw, bytes):
                tagged.setdefault(layout.format_digest(raw), []).append(tag)
        linked = [
            layout.format_digest(raw)
            for hexdigest, raw in zip(revisions, found_revisions, strict=True)
            if isinstance(raw, bytes) and raw.hex() == hexdigest
        ]
        for digest in sorted(set(linked) | set(tagged)):
            yield {
                "repository": name,
                "digest": digest,
                "tags": tagged.get(digest, []),
                "linked": digest in linked,
            }


async def blobs(storage: Storage) -> AsyncIterator[Row]:
    """One row a blob: digest, size (None for a blob directory without data)."""
    for shard in layout.SHARDS:
        # nothing is "in use" here: every blob of the shard comes back, with its data's stat
        _count, entries = await storage.blobs_outside(shard, frozenset())
        for entry in sorted(entries, key=lambda e: e.hex):
            yield {"digest": f"sha256:{entry.hex}", "size": entry.size}


def rows(storage: Storage, what: str, repository: str | None = None) -> AsyncIterator[Row]:
    if what == "repositories":
        return repositories(storage)
    if what == "manifests":
        return manifests(storage, repository)
    return blobs(storage)


async def print_listing(settings: Settings, what: str, repository: str | None) -> int:
    """``registry-pruned list ...``: NDJSON on stdout; the exit status."""
    storage = open_storage(settings.storage, settings.workers)
    try:
        await storage.probe()
        async for row in rows(storage, what, repository):
            sys.stdout.write(json.dumps(row) + "\n")
        return 0
    except (StorageError, NoRepository) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await storage.close()
