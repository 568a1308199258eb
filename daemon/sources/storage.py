"""The storage reference source: every linked manifest revision and what it references.

Agrees with distribution 2.8's ``garbage-collect`` (without --delete-untagged): a revision
counts when its link parses and its blob exists; a link that does not parse, or a manifest
that cannot be read or parsed, fails the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import structlog

from daemon import layout, manifests
from daemon.config import ConfigError
from daemon.inventory import DigestSet, Inventory
from daemon.progress import Progress
from daemon.sources.base import Marks, ReferenceSource, SourceError
from daemon.storage.base import Storage, StorageError
from daemon.usage import UsagePairs

MANIFEST_LIMIT = 4 * 1024 * 1024  # distribution refuses larger manifest payloads
CHUNK = 128


class StorageSource(ReferenceSource):
    name = "storage"
    online_refusal = (
        "online delete is not offered for the storage source: a client that pushes while "
        "the run deletes can find an old orphan layer still present, skip uploading it, and "
        "push a manifest that references it just after the last re-check; nothing in the "
        "store tells the pruner in time. Put the registry in read-only mode "
        "(storage.maintenance.readonly.enabled: true), run the delete, then switch it back"
    )

    def __init__(
        self,
        concurrency: int = 16,
        log: structlog.typing.FilteringBoundLogger | None = None,
        read_only: Callable[[], bool] | None = None,
    ) -> None:
        self.concurrency = max(1, concurrency)
        self.log = log or structlog.get_logger()
        #: reads the registry's config again (it may have changed since the daemon started)
        self._read_only = read_only

    async def registry_read_only(self) -> bool | None:
        if self._read_only is None:
            return None
        try:
            return await asyncio.to_thread(self._read_only)
        except ConfigError as exc:
            raise SourceError(
                f"cannot tell whether the registry is read-only: {exc}; nothing was deleted"
            ) from exc

    async def mark(self, inventory: Inventory, storage: Storage, progress: Progress) -> Marks:
        # compact in-use set: ~45 bytes a digest where a set[bytes] took ~110 (bench/README.md)
        in_use = DigestSet()
        marks = Marks(in_use=in_use)
        if self.usage_wanted:
            # each repository reads its own revisions, even one another repository read:
            # its pairs need the references (the seen set below is not kept then)
            marks.usage = UsagePairs(inventory)
        seen: set[bytes] = set()  # manifests read or being read (raw: 70 bytes less than hex)
        work = self._chunks(inventory)

        async def worker() -> None:
            for chunk in work:
                await self._mark_chunk(storage, chunk, seen, marks, progress)

        tasks = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        # the last merges a shard at a time, between status requests, not in one len()
        for shard in in_use.settle_steps():
            if shard % 16 == 15:
                await asyncio.sleep(0)
        return marks

    @staticmethod
    def _chunks(inventory: Inventory, size: int = CHUNK) -> Iterator[list[tuple[str, str]]]:
        chunk: list[tuple[str, str]] = []
        for repo in inventory.repositories.values():
            for hexdigest in repo.revisions:
                chunk.append((repo.name, hexdigest))
                if len(chunk) >= size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk

    async def _mark_chunk(
        self,
        storage: Storage,
        chunk: list[tuple[str, str]],
        seen: set[bytes],
        marks: Marks,
        progress: Progress,
    ) -> None:
        links = [layout.revision_dir(repo, hexdigest) + "link" for repo, hexdigest in chunk]
        try:
            named = await storage.read_parsed(links, 1024, layout.link_digest)
        except StorageError as exc:
            raise SourceError(f"cannot read manifest links: {exc}") from exc
        todo: list[tuple[str, str, bytes]] = []
        for (repo, hexdigest), link, raw in zip(chunk, links, named, strict=True):
            if raw is None:
                continue  # removed since the scan: distribution would not see it either
            if isinstance(raw, ValueError):
                raise SourceError(f"manifest link {storage.location(link)} is corrupt: {raw}")
            if raw.hex() != hexdigest:
                marks.notes.append(
                    f"{repo}: link {link} names {layout.format_digest(raw)}; skipped"
                )
                continue
            if marks.usage is not None:
                todo.append((repo, hexdigest, raw))
            elif raw not in seen:
                seen.add(raw)
                todo.append((repo, hexdigest, raw))
        if not todo:
            return
        keys = [layout.blob_data(hexdigest) for _repo, hexdigest, _raw in todo]
        try:
            found = await storage.read_parsed(keys, MANIFEST_LIMIT, manifests.packed_references)
        except StorageError as exc:
            raise SourceError(f"cannot read manifests: {exc}") from exc
        for (repo, hexdigest, raw), refs in zip(todo, found, strict=True):
            if refs is None:
                # distribution's enumerator skips a revision whose blob is gone
                seen.discard(raw)
                marks.notes.append(f"{repo}: revision sha256:{hexdigest} has no blob; skipped")
                self.log.warning(
                    "revision without blob", repository=repo, digest=f"sha256:{hexdigest}"
                )
                continue
            if isinstance(refs, ValueError):
                raise SourceError(f"manifest sha256:{hexdigest} of {repo} cannot be parsed: {refs}")
            packed, foreign = refs
            marks.in_use.add(raw)
            marks.in_use.update_packed(packed)
            if marks.usage is not None:
                marks.usage.add(repo, raw)
                marks.usage.add_packed(repo, packed)
            if foreign:
                marks.notes.append(f"{repo}: sha256:{hexdigest} references {', '.join(foreign)}")
            progress.manifests += 1
