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
from daemon.storage.base import NotFound, Storage, StorageError

MANIFEST_LIMIT = 4 * 1024 * 1024  # distribution refuses larger manifest payloads


class StorageSource(ReferenceSource):
    name = "storage"

    def __init__(
        self, concurrency: int = 16, log: structlog.typing.FilteringBoundLogger | None = None
    ) -> None:
        self.concurrency = max(1, concurrency)
        self.log = log or structlog.get_logger()

    async def mark(self, inventory: Inventory, storage: Storage, progress: Progress) -> Marks:
        marks = Marks()
        seen: set[str] = set()
        work = self._revisions(inventory)

        async def worker() -> None:
            for repo, hexdigest in work:
                await self._mark_revision(storage, repo, hexdigest, seen, marks, progress)

        tasks = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return marks

    @staticmethod
    def _revisions(inventory: Inventory) -> Iterator[tuple[str, str]]:
        for repo in inventory.repositories.values():
            for hexdigest in repo.revisions:
                yield repo.name, hexdigest

    async def _mark_revision(
        self,
        storage: Storage,
        repo: str,
        hexdigest: str,
        seen: set[str],
        marks: Marks,
        progress: Progress,
    ) -> None:
        link = layout.revision_dir(repo, hexdigest) + "link"
        try:
            text = (await storage.read(link, 1024)).decode("ascii", "replace")
        except NotFound:
            return  # removed since the walk: distribution would not see it either
        except StorageError as exc:
            raise SourceError(f"cannot read manifest link {storage.location(link)}: {exc}") from exc
        try:
            raw = layout.parse_digest(text)
        except layout.InvalidDigest as exc:
            raise SourceError(f"manifest link {storage.location(link)} is corrupt: {exc}") from None
        if raw.hex() != hexdigest:
            marks.notes.append(f"{repo}: link {link} names {text.strip()}; skipped")
            return
        if hexdigest in seen:
            return
        seen.add(hexdigest)
        data_key = layout.blob_data(hexdigest)
        try:
            data = await storage.read(data_key, MANIFEST_LIMIT)
        except NotFound:
            # distribution's enumerator skips a revision whose blob is gone
            seen.discard(hexdigest)
            marks.notes.append(f"{repo}: revision sha256:{hexdigest} has no blob; skipped")
            self.log.warning("revision without blob", repository=repo, digest=f"sha256:{hexdigest}")
            return
        except StorageError as exc:
            raise SourceError(
                f"cannot read manifest sha256:{hexdigest} of {repo} "
                f"({storage.location(data_key)}): {exc}"
            ) from exc
        try:
            refs = manifests.parse(data)
        except manifests.ManifestError as exc:
            raise SourceError(
                f"manifest sha256:{hexdigest} of {repo} cannot be parsed: {exc}"
            ) from None
        marks.in_use.add(raw)
        marks.in_use.update(refs.blobs)
        marks.in_use.update(refs.children)
        if refs.foreign:
            marks.notes.append(f"{repo}: sha256:{hexdigest} references {', '.join(refs.foreign)}")
        progress.manifests += 1
