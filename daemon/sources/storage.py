"""The storage reference source: every linked manifest revision and what it references.

Agrees with distribution 2.8's ``garbage-collect`` (without --delete-untagged): a revision
counts when its link parses and its blob exists; a link that does not parse, or a manifest
that cannot be read or parsed, fails the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import structlog

from daemon import layout, manifests
from daemon.inventory import Inventory
from daemon.progress import Progress
from daemon.sources.base import Marks, ReferenceSource, SourceError
from daemon.storage.base import Storage, StorageError

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
        self, concurrency: int = 16, log: structlog.typing.FilteringBoundLogger | None = None
    ) -> None:
        self.concurrency = max(1, concurrency)
        self.log = log or structlog.get_logger()

    async def mark(self, inventory: Inventory, storage: Storage, progress: Progress) -> Marks:
        marks = Marks()
        seen: set[str] = set()
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
        seen: set[str],
        marks: Marks,
        progress: Progress,
    ) -> None:
        links = [layout.revision_dir(repo, hexdigest) + "link" for repo, hexdigest in chunk]
        try:
            contents = await storage.read_many(links, 1024)
        except StorageError as exc:
            raise SourceError(f"cannot read manifest links: {exc}") from exc
        todo: list[tuple[str, str]] = []
        for (repo, hexdigest), link, content in zip(chunk, links, contents, strict=True):
            if content is None:
                continue  # removed since the scan: distribution would not see it either
            text = content.decode("ascii", "replace")
            try:
                raw = layout.parse_digest(text)
            except layout.InvalidDigest as exc:
                raise SourceError(
                    f"manifest link {storage.location(link)} is corrupt: {exc}"
                ) from None
            if raw.hex() != hexdigest:
                marks.notes.append(f"{repo}: link {link} names {text.strip()[:80]}; skipped")
                continue
            if hexdigest not in seen:
                seen.add(hexdigest)
                todo.append((repo, hexdigest))
        if not todo:
            return
        keys = [layout.blob_data(hexdigest) for _repo, hexdigest in todo]
        try:
            datas = await storage.read_many(keys, MANIFEST_LIMIT)
        except StorageError as exc:
            raise SourceError(f"cannot read manifests: {exc}") from exc
        for (repo, hexdigest), data in zip(todo, datas, strict=True):
            if data is None:
                # distribution's enumerator skips a revision whose blob is gone
                seen.discard(hexdigest)
                marks.notes.append(f"{repo}: revision sha256:{hexdigest} has no blob; skipped")
                self.log.warning(
                    "revision without blob", repository=repo, digest=f"sha256:{hexdigest}"
                )
                continue
            try:
                refs = manifests.parse(data)
            except manifests.ManifestError as exc:
                raise SourceError(
                    f"manifest sha256:{hexdigest} of {repo} cannot be parsed: {exc}"
                ) from None
            marks.in_use.add(bytes.fromhex(hexdigest))
            marks.in_use.update(refs.blobs)
            marks.in_use.update(refs.children)
            if refs.foreign:
                marks.notes.append(
                    f"{repo}: sha256:{hexdigest} references {', '.join(refs.foreign)}"
                )
            progress.manifests += 1
