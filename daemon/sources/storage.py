"""The storage reference source: every linked manifest revision and what it references.

Agrees with distribution 2.8's ``garbage-collect`` (without --delete-untagged): a revision
counts when its link parses and its blob exists; a link that does not parse, or a manifest
that cannot be read or parsed, fails the run. Beyond it (where it loses images): a sha384 or
sha512 reference is resolved through the repository's links as the registry resolves it (and
fails the run where it cannot be), and an index child that no revision links is read too.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from daemon import layout, manifests, memory
from daemon.config import ConfigError
from daemon.inventory import DigestSet, Inventory
from daemon.packed import Spill
from daemon.progress import Progress
from daemon.sources.base import Marks, ReferenceSource, SourceError
from daemon.storage.base import Storage, StorageError
from daemon.usage import UsagePairs
from daemon.workers import each

MANIFEST_LIMIT = 4 * 1024 * 1024  # distribution refuses larger manifest payloads
CHUNK = 128


@dataclass(slots=True)
class _Pass:
    """One mark phase's shared state."""

    storage: Storage
    inventory: Inventory
    marks: Marks
    progress: Progress
    #: manifests read or being read (raw), packed: ~36 bytes a manifest where a set took ~110
    seen: DigestSet = field(default_factory=lambda: DigestSet(lookups=True))
    #: index children no revision may link, to read once the revisions are: (repository,
    #: child, named by sha384/sha512 and resolved through the link the registry uses)
    pending: list[tuple[str, bytes, bool]] = field(default_factory=list)
    #: revisions whose directory is there but whose link is not (a manifest deleted)
    gone: list[tuple[str, bytes]] = field(default_factory=list)


class StorageSource(ReferenceSource):
    name = "storage"
    online_refusal = (
        "online delete is not offered for the storage source: a client that pushes while "
        "the run deletes can find an old orphan layer still present, skip uploading it, and "
        "push a manifest that references it just after the last re-check; nothing in the "
        "store tells the pruner in time"
    )
    online_hint = (
        "put the registry in read-only mode (storage.maintenance.readonly.enabled: true), "
        "run the delete without online=true, then switch it back"
    )

    def __init__(
        self,
        concurrency: int = 16,
        log: structlog.typing.FilteringBoundLogger | None = None,
        read_only: Callable[[], bool] | None = None,
        spill_dir: Path | None = None,
    ) -> None:
        self.concurrency = max(1, concurrency)
        #: where the mark's in-use set spills (the state dir; None: the system's temp dir)
        self.spill_dir = spill_dir
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
        # compact in-use set: ~45 bytes a digest where a set[bytes] took ~110 (bench/README.md);
        # spilled to a temporary file until it is sorted, a shard at a time, below (issue 19)
        in_use = DigestSet(spill=Spill(self.spill_dir))
        marks = Marks(in_use=in_use)
        if self.usage_wanted:
            # each repository reads its own revisions, even one another repository read:
            # its pairs need the references
            marks.usage = UsagePairs(inventory)
        run = _Pass(storage, inventory, marks, progress)
        await each(
            self._chunks(inventory), functools.partial(self._mark_chunk, run), self.concurrency
        )
        await self._mark_unlinked(run)
        run.seen = DigestSet()  # no longer asked: freed before the in-use set is sorted
        memory.give_back()
        # the last merges a shard at a time, between status requests, not in one len()
        for shard in in_use.settle_steps():
            if shard % 16 == 15:
                await asyncio.sleep(0)
        return run.marks

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

    async def _mark_chunk(self, run: _Pass, chunk: list[tuple[str, str]]) -> None:
        storage, marks = run.storage, run.marks
        links = [layout.revision_dir(repo, hexdigest) + "link" for repo, hexdigest in chunk]
        try:
            named = await storage.read_parsed(links, 1024, layout.link_digest)
        except StorageError as exc:
            raise SourceError(f"cannot read manifest links: {exc}") from exc
        todo: list[tuple[str, str, bytes]] = []
        for (repo, hexdigest), link, raw in zip(chunk, links, named, strict=True):
            if raw is None:
                # removed since the scan, or deleted leaving its directory: distribution
                # does not see it either (an index may still name it: _mark_unlinked)
                run.gone.append((repo, bytes.fromhex(hexdigest)))
                continue
            if isinstance(raw, ValueError):
                raise SourceError(f"manifest link {storage.location(link)} is corrupt: {raw}")
            if raw.hex() != hexdigest:
                marks.notes.append(
                    f"{repo}: link {link} names {layout.format_digest(raw)}; skipped"
                )
                continue
            if raw not in run.seen or marks.usage is not None:
                run.seen.add(raw)
                todo.append((repo, hexdigest, raw))
        await self._mark_manifests(run, todo)

    async def _mark_manifests(self, run: _Pass, todo: list[tuple[str, str, bytes]]) -> None:
        """Read, parse and mark the manifests ``todo`` names."""
        if not todo:
            return
        storage, marks = run.storage, run.marks
        keys = [layout.blob_data(hexdigest) for _repo, hexdigest, _raw in todo]
        try:
            found = await storage.read_parsed(keys, MANIFEST_LIMIT, manifests.packed_references)
        except StorageError as exc:
            raise SourceError(f"cannot read manifests: {exc}") from exc
        foreign: list[tuple[str, str, str, bool]] = []  # (repo, manifest hex, digest, child)
        for (repo, hexdigest, raw), refs in zip(todo, found, strict=True):
            if refs is None:
                # distribution's enumerator skips a revision whose blob is gone
                run.seen.discard(raw)
                marks.notes.append(f"{repo}: revision sha256:{hexdigest} has no blob; skipped")
                self.log.warning(
                    "revision without blob", repository=repo, digest=f"sha256:{hexdigest}"
                )
                continue
            if isinstance(refs, ValueError):
                raise SourceError(f"manifest sha256:{hexdigest} of {repo} cannot be parsed: {refs}")
            blobs, children, foreign_blobs, foreign_children = refs
            marks.in_use.add(raw)
            marks.in_use.update_packed(blobs)
            if marks.usage is not None:
                marks.usage.add(repo, raw)
                marks.usage.add_packed(repo, blobs + children)
            if children:
                marks.in_use.update_packed(children)
                revisions = run.inventory.repositories[repo].revisions
                for i in range(0, len(children), 32):
                    child = children[i : i + 32]
                    if child.hex() not in revisions and child not in run.seen:
                        run.pending.append((repo, child, False))
            foreign += [(repo, hexdigest, d, False) for d in foreign_blobs]
            foreign += [(repo, hexdigest, d, True) for d in foreign_children]
            run.progress.manifests += 1
        for repo, child in await self._resolve(storage, foreign, marks):
            if child not in run.seen:
                run.pending.append((repo, child, True))

    async def _mark_unlinked(self, run: _Pass) -> None:
        """Read the index children that no revision link names, where the registry serves
        them: through the sha384/sha512 link that resolved them, or through a _layers link
        (distribution 2.1.0 linked manifests there, and the registry still looks there).
        Where nothing links a child the registry cannot serve it: distribution reads it no
        further, nor do we."""
        tried: set[tuple[str, bytes]] = set()
        while True:
            check: list[tuple[str, bytes]] = []
            todo: list[tuple[str, str, bytes]] = []
            pending, run.pending = run.pending, []
            for repo, child, resolved in pending:
                if child in run.seen or (repo, child) in tried:
                    continue
                tried.add((repo, child))
                if resolved:
                    run.seen.add(child)
                    todo.append((repo, child.hex(), child))
                else:
                    check.append((repo, child))
            # in digest order: the in-use set answers a shard at a time (bench/README.md)
            run.gone.sort(key=lambda item: item[1])
            for repo, raw in run.gone:
                if raw not in run.seen and (repo, raw) not in tried and raw in run.marks.in_use:
                    tried.add((repo, raw))
                    check.append((repo, raw))
            if check:
                keys = [layout.layer_link_dir(repo, child.hex()) + "link" for repo, child in check]
                try:
                    named = await run.storage.read_parsed(keys, 1024, layout.link_digest)
                except StorageError as exc:
                    raise SourceError(f"cannot read layer links: {exc}") from exc
                for (repo, child), raw in zip(check, named, strict=True):
                    if raw == child and child not in run.seen:
                        run.seen.add(child)
                        todo.append((repo, child.hex(), child))
            if not todo:
                return
            for start in range(0, len(todo), CHUNK):
                await self._mark_manifests(run, todo[start : start + CHUNK])

    async def _resolve(
        self, storage: Storage, foreign: list[tuple[str, str, str, bool]], marks: Marks
    ) -> list[tuple[str, bytes]]:
        """Mark the blobs that sha384/sha512 references stand for, through the repository's
        links, as the registry finds them; the resolved children, to read in turn."""
        if not foreign:
            return []
        # the registry looks up a blob in _layers/<algorithm>/<hex>/link, and a manifest in
        # _manifests/revisions/<algorithm>/<hex>/link, then in _layers (blobLinkPath)
        keys: list[str] = []
        for repo, _hexdigest, digest, child in foreign:
            if child:
                keys.append(layout.foreign_revision_dir(repo, digest) + "link")
            keys.append(layout.foreign_layer_link_dir(repo, digest) + "link")
        try:
            named = iter(await storage.read_parsed(keys, 1024, layout.link_digest))
            places = iter(keys)
        except StorageError as exc:
            raise SourceError(f"cannot read the links of sha384/sha512 references: {exc}") from exc
        children: list[tuple[str, bytes]] = []
        for repo, hexdigest, digest, child in foreign:
            tried = [next(places) for _ in range(2 if child else 1)]
            answers = [next(named) for _ in tried]
            raw: bytes | None = None
            for place, answer in zip(tried, answers, strict=True):
                if isinstance(answer, ValueError):
                    raise SourceError(
                        f"manifest sha256:{hexdigest} of {repo} references {digest}, whose link "
                        f"{storage.location(place)} is corrupt ({answer}); nothing was deleted. "
                        f"Repair or remove the link (or push the {'manifest' if child else 'blob'}"
                        " again), then run again"
                    )
                if answer is not None and raw is None:
                    raw = answer
            if raw is None:
                missing = " nor ".join(storage.location(place) for place in tried)
                raise SourceError(
                    f"manifest sha256:{hexdigest} of {repo} references {digest}, but "
                    f"{'neither ' if child else ''}{missing} exists, so nothing says which blob "
                    "it is (the registry cannot serve it either); nothing was deleted. Upload "
                    f"that content to {repo} again with ?digest={digest} (or delete manifest "
                    f"sha256:{hexdigest}), then run again"
                )
            marks.in_use.add(raw)
            if marks.usage is not None:
                marks.usage.add(repo, raw)
            if child:
                children.append((repo, raw))
        return children
