"""Moving what a delete removes aside, inside the store, and back: one mechanism for the trash
(``trash=<duration>``) and for online mode's parking place.

A run moves keys to ``_registry-pruned/trash/<run-id>/<key>`` (each key's relative path kept)
and appends what it moved to ``manifest/<n>.json`` there; ``trash.json`` says the trash's
state. Only the holder of the store's delete lease writes here, so a trash still ``moving``
or ``restoring`` while another run holds the lease was left by a process that died: the next
delete run puts it back before it decides anything, and the next restore finishes it.
A restore walks the trash itself (the truth, whatever a crash left in the manifest), puts each
key back unless the key exists again (a copy whose delete did not happen, or a key written
again since: the store's own is kept), then leaves only ``trash.json`` saying ``restored``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from daemon import layout
from daemon.storage.base import DeleteFailure, NotFound, Storage, StorageError

T = TypeVar("T")
ROOT = f"{layout.OWN}trash/"
META = "trash.json"
MANIFEST = "manifest/"
MOVING, COMPLETE, RESTORING, RESTORED, PURGED = (
    "moving",
    "complete",
    "restoring",
    "restored",
    "purged",
)
#: a trash in one of these states was left half done by a process that died
UNFINISHED = (MOVING, RESTORING)
_BATCH = 1000


class TrashGone(Exception):
    """A restore that cannot be done: no trash for that run, or purged, or still moving."""


@dataclass(frozen=True, slots=True)
class Restored:
    objects: int
    bytes: int
    already: bool = False  # the trash had been restored before: nothing was moved now

    def document(self) -> dict[str, Any]:
        return {"objects": self.objects, "bytes": self.bytes}


def _order(key: str) -> int:
    """Restore order: blobs first, then links, then tags, whole repositories and the rest."""
    if key.startswith(layout.BLOBS):
        return 0
    kind = layout.classify_repo_key(key)
    if kind is not None and kind.kind in ("revision", "layer", "foreign_layer", "foreign_revision"):
        return 1
    return 2


def _parents(key: str, top: str) -> list[str]:
    """The directories from ``key``'s own up to ``top`` (inclusive), deepest first."""
    out: list[str] = []
    head = key.rsplit("/", 1)[0] + "/"
    while head.startswith(top) and len(head) >= len(top):
        out.append(head)
        if head == top:
            break
        head = head[:-1].rsplit("/", 1)[0] + "/"
    return out


class Trash:
    """One run's part of the trash."""

    def __init__(
        self,
        storage: Storage,
        run_id: str,
        log: structlog.typing.FilteringBoundLogger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not run_id or "/" in run_id or run_id in (".", ".."):
            raise ValueError(f"not a run id: {run_id!r}")
        self.storage = storage
        self.run_id = run_id
        self.root = f"{ROOT}{run_id}/"
        self.log = log or structlog.get_logger()
        self.clock = clock
        self.keep: float = 0.0  # seconds the trash is kept; 0: parking only (online mode)
        self.begun = False
        self._chunk = 0

    def trashed(self, key: str) -> str:
        return self.root + key

    # -- the trash's record ---------------------------------------------------------------

    async def meta(self) -> dict[str, Any] | None:
        """``trash.json``: None where this run has no trash at all."""
        try:
            data = await self.storage.read(self.root + META, 1 << 16)
        except NotFound:
            return None
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        # torn or foreign: a trash whose record is unreadable is handled as one left moving
        return doc if isinstance(doc, dict) else {"run": self.run_id, "state": MOVING}

    async def _write_meta(self, doc: dict[str, Any]) -> None:
        await self.storage.write(self.root + META, json.dumps(doc, indent=1).encode())

    async def begin(self, keep: float) -> None:
        """Say this run is moving things aside (written before the first move: a full
        store fails the run here, before anything was removed)."""
        if self.begun:
            return
        self.keep = keep
        now = self.clock()
        await self._write_meta(
            {
                "run": self.run_id,
                "state": MOVING,
                "created": now,
                "keep_seconds": keep,
                "expires": now + keep if keep else None,
            }
        )
        self.begun = True

    # -- moving aside ---------------------------------------------------------------------

    async def move(
        self, items: Sequence[tuple[str, int | None]]
    ) -> tuple[list[str], list[DeleteFailure]]:
        """Move keys (with their sizes where known) aside: those moved, and the failures."""
        if not items:
            return [], []
        # the manifest says what this run moved (or set out to move), for people and tools;
        # written first, so that a store too full to take it fails the batch before it moves.
        # A restore walks the trash itself: whatever a crash left, nothing is missed
        self._chunk += 1
        chunk = json.dumps({"keys": [key for key, _size in items]}).encode()
        await self.storage.write(f"{self.root}{MANIFEST}{self._chunk:06d}.json", chunk)
        return await self.storage.move_keys([(key, self.trashed(key), size) for key, size in items])

    async def park(self, hexes: Sequence[str]) -> tuple[list[str], list[DeleteFailure]]:
        """Move blobs' data aside: the hex digests moved, and failures named by hex digest."""
        failures = [
            DeleteFailure(h, "not a sha256 hex digest") for h in hexes if not layout.is_hex(h)
        ]
        good = [h for h in hexes if layout.is_hex(h)]
        moved, failed = await self.move([(layout.blob_data(h), None) for h in good])
        failures += [DeleteFailure(f.key.rsplit("/", 2)[-2], f.reason, f.kept) for f in failed]
        parked = [key.rsplit("/", 2)[-2] for key in moved]
        # the blob directories go where a delete would remove them (filesystem)
        await self.storage.remove_empty_dirs([layout.blob_dir(h) for h in parked])
        return parked, failures

    async def move_blobs(self, hexes: Sequence[str]) -> list[DeleteFailure]:
        """Move blobs' data aside; failures named by hex digest, like ``delete_blobs``."""
        _parked, failures = await self.park(hexes)
        return failures

    async def move_trees(self, prefixes: Sequence[str]) -> list[DeleteFailure]:
        """Move everything below each prefix aside; one failure per prefix not wholly moved."""
        owner: dict[str, str] = {}
        items: list[tuple[str, int | None]] = []
        for prefix in prefixes:
            if not prefix.strip("/") or not prefix.endswith("/"):
                raise ValueError(f"move_trees needs directory prefixes, not {prefix!r}")
            kind = layout.classify_repo_key(prefix + "link")
            if kind is not None and kind.kind in ("layer", "foreign_layer"):
                # a layer link directory holds its link only: no listing per orphan's link
                owner[prefix + "link"] = prefix
                items.append((prefix + "link", None))
                continue
            async for batch in self.storage.walk(prefix):
                for entry in batch:
                    owner[entry.key] = prefix
                    items.append((entry.key, entry.size))
        failures: dict[str, DeleteFailure] = {}
        for start in range(0, len(items), _BATCH):
            _moved, failed = await self.move(items[start : start + _BATCH])
            for failure in failed:
                top = owner.get(failure.key, failure.key)
                failures.setdefault(top, DeleteFailure(top, failure.reason, failure.kept))
        # a filesystem keeps the emptied directories: they go, as a delete removes them
        dirs: dict[str, None] = {}
        for key, top in owner.items():
            if top not in failures:
                dirs.update(dict.fromkeys(_parents(key, top)))
        await self.storage.remove_empty_dirs(sorted(dirs, key=len, reverse=True))
        return list(failures.values())

    # -- online mode: deciding about what was parked ----------------------------------------

    async def put_back(self, keys: Sequence[str]) -> int:
        """Put these (original) keys back from the trash; how many moved back."""
        moved, _size = await self._restore_keys([self.trashed(k) for k in keys])
        return len(moved)

    async def drop(self, keys: Sequence[str]) -> list[DeleteFailure]:
        """Delete the trashed copies of these keys for good; failures named by key."""
        failures = await self.storage.delete_keys([self.trashed(k) for k in keys])
        return [DeleteFailure(f.key[len(self.root) :], f.reason, f.kept) for f in failures]

    # -- the end of a run -----------------------------------------------------------------

    async def seal(self) -> dict[str, Any] | None:
        """The run is over: a kept trash says ``complete`` with its totals; a parking place
        (no trash asked) puts back anything still parked and goes. The record, or None."""
        if not self.begun:
            return None
        objects, size = await self._contents()
        if not self.keep or not objects:
            # nothing undecided stays parked: back it goes, the way a dead run's would
            if objects:
                await self._restore_all()
            await self.storage.delete_tree(self.root)
            await self.storage.remove_empty_dirs([self.root, ROOT, layout.OWN])
            return None
        doc = await self.meta() or {}
        doc.update(state=COMPLETE, objects=objects, bytes=size, sealed=self.clock())
        await self._write_meta(doc)
        return doc

    async def _entries(self) -> list[tuple[str, int]]:
        """Every key moved into the trash (its trashed key) and its size."""
        out: list[tuple[str, int]] = []
        async for batch in self.storage.walk(self.root):
            entries = [e for e in batch if not self._ours(e.key)]
            unsized = [e.key for e in entries if e.size is None]  # a filesystem's walk
            sizes: dict[str, int] = {}
            for start in range(0, len(unsized), 256):
                part = unsized[start : start + 256]
                stats = await self.storage.stat_many(part)
                sizes.update((k, st.size or 0) for k, st in zip(part, stats, strict=True) if st)
            out += [(e.key, e.size if e.size is not None else sizes.get(e.key, 0)) for e in entries]
        return out

    async def _contents(self) -> tuple[int, int]:
        """How many keys the trash holds, and their bytes."""
        entries = await self._entries()
        return len(entries), sum(size for _key, size in entries)

    def _ours(self, key: str) -> bool:
        """The trash's own record, not a key moved into it."""
        rest = key[len(self.root) :]
        return rest == META or rest.startswith(MANIFEST)

    # -- restore and purge -----------------------------------------------------------------

    async def restore(self) -> Restored:
        """Put everything back (blobs, then links, then tags and repositories); resumable.
        TrashGone where there is nothing to restore."""
        doc = await self.meta()
        if doc is None:
            raise TrashGone(f"run {self.run_id} has no trash in this store (it ran without trash)")
        state = doc.get("state")
        if state == PURGED:
            raise TrashGone(
                f"the trash of run {self.run_id} was purged at {_when(doc.get('purged'))} "
                "(it expired): nothing is left to restore"
            )
        if state == RESTORED:
            return Restored(int(doc.get("objects", 0)), int(doc.get("bytes", 0)), already=True)
        doc["state"] = RESTORING
        doc.setdefault("restore_started", self.clock())
        await self._write_meta(doc)
        objects, size = await self._restore_all()
        await self._clear_all_but_meta()
        # the whole trash is back (also what killed attempts had put back): its sealed totals
        objects = int(doc.get("objects", objects))
        size = int(doc.get("bytes", size))
        doc.update(state=RESTORED, restored=self.clock(), objects=objects, bytes=size)
        await self._write_meta(doc)
        return Restored(objects, size)

    async def _restore_all(self, aged: set[str] | None = None) -> tuple[int, int]:
        """Everything back; the hex digests of the blobs moved back go into ``aged``."""
        found = sorted(
            (_order(key[len(self.root) :]), key, size) for key, size in await self._entries()
        )
        objects = size = 0
        for group in range(3):
            keys = [(k, s) for g, k, s in found if g == group]
            for start in range(0, len(keys), _BATCH):
                part = dict(keys[start : start + _BATCH])
                moved, moved_bytes = await self._restore_keys(list(part), part)
                objects += len(moved)
                size += moved_bytes
                if aged is not None and group == 0:
                    aged.update(k.rsplit("/", 2)[-2] for k in moved if k.endswith("/data"))
        return objects, size

    async def _restore_keys(
        self, trashed: Sequence[str], sizes: Mapping[str, int] | None = None
    ) -> tuple[list[str], int]:
        """Move trashed keys back where their original is missing; drop the copy where it
        exists (a copy whose delete was cut short, or a key written again since). The
        (trashed) keys that went back, and their bytes (by ``sizes``)."""
        originals = [k[len(self.root) :] for k in trashed]
        present: set[str] = set()
        for start in range(0, len(originals), 256):
            part = originals[start : start + 256]
            stats = await self.storage.stat_many(part)
            present.update(k for k, s in zip(part, stats, strict=True) if s is not None)
        missing = [(t, o) for t, o in zip(trashed, originals, strict=True) if o not in present]
        moved, failures = await self.storage.move_keys([(t, o, None) for t, o in missing])
        if failures:
            raise StorageError(
                f"cannot put {failures[0].key} back: {failures[0].reason} "
                f"({len(failures)} keys); run the restore again"
            )
        dropped = [t for t, o in zip(trashed, originals, strict=True) if o in present]
        failed = await self.storage.delete_keys(dropped)
        if failed:
            raise StorageError(
                f"cannot remove the trashed copy {failed[0].key}: {failed[0].reason}; "
                "run the restore again"
            )
        return moved, sum((sizes or {}).get(k, 0) for k in moved)

    async def _clear_all_but_meta(self) -> None:
        # the trash holds registry keys (blobs/, repositories/) and its manifest only
        for sub in (MANIFEST, layout.BLOBS.split("/")[0] + "/", layout.REPOSITORIES):
            failures = await self.storage.delete_tree(self.root + sub)
            if failures:
                raise StorageError(f"cannot remove {failures[0].key}: {failures[0].reason}")

    async def purge(self) -> int:
        """Delete the trash for good, leaving its record saying ``purged``; bytes freed."""
        doc = await self.meta() or {"run": self.run_id}
        objects, size = await self._contents()
        doc.update(state=PURGED, purged=self.clock(), purged_objects=objects, purged_bytes=size)
        await self._write_meta(doc)  # first: a purge cut short is a purge, never a restore
        await self._clear_all_but_meta()
        return size


def _when(epoch: object) -> str:
    from datetime import UTC, datetime

    if not isinstance(epoch, (int, float)):
        return "an unknown time"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


async def trashes(
    storage: Storage, log: structlog.typing.FilteringBoundLogger | None = None
) -> list[tuple[Trash, dict[str, Any]]]:
    """Every run's trash in the store with its record, oldest first."""
    _files, dirs = await storage.list_dir(ROOT)
    out = []
    for name in sorted(dirs):
        try:
            trash = Trash(storage, name, log)
        except ValueError:
            continue
        doc = await trash.meta()
        if doc is not None:
            out.append((trash, doc))
    return out


def listing(entries: list[tuple[Trash, dict[str, Any]]]) -> list[dict[str, Any]]:
    """``GET /trash``: the trashed runs whose trash is there to restore."""
    return [
        {
            "id": trash.run_id,
            "state": doc.get("state"),
            "bytes": doc.get("bytes", 0),
            "objects": doc.get("objects", 0),
            "created": _iso(doc.get("created")),
            "expires": _iso(doc.get("expires")),
        }
        for trash, doc in entries
        if doc.get("state") in (COMPLETE, MOVING, RESTORING)
    ]


def _iso(epoch: object) -> str | None:
    from datetime import UTC, datetime

    if not isinstance(epoch, (int, float)):
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def settle_unfinished(
    storage: Storage, own: str, log: structlog.typing.FilteringBoundLogger
) -> tuple[int, set[str]]:
    """Under the lease: put back every trash a dead process left moving or restoring (its
    run was interrupted: nothing of it stands). How many keys went back, and the blobs a dead
    delete had moved aside: their age was judged by that run (an object store's copy back
    makes them look new, and the grace period would keep them a run longer)."""
    back = 0
    aged: set[str] = set()
    for trash, doc in await trashes(storage, log):
        if trash.run_id == own or doc.get("state") not in UNFINISHED:
            continue
        if doc.get("state") == RESTORING:
            restored = await trash.restore()
            back += restored.objects
            log.warning("finished a restore a process left half done", trash_run=trash.run_id)
            continue
        objects, _size = await trash._restore_all(aged)
        await storage.delete_tree(trash.root)
        back += objects
        log.warning(
            "put back what an interrupted run had moved aside", trash_run=trash.run_id, keys=objects
        )
    if back:
        await storage.remove_empty_dirs([ROOT, layout.OWN])
    return back, aged


async def purge_expired(
    storage: Storage, log: structlog.typing.FilteringBoundLogger, now: float | None = None
) -> tuple[int, int]:
    """Under the lease: purge every complete trash past its expiry; (runs, bytes freed)."""
    now = time.time() if now is None else now
    runs = freed = 0
    for trash, doc in await trashes(storage, log):
        expires = doc.get("expires")
        if doc.get("state") != COMPLETE or not isinstance(expires, (int, float)) or expires > now:
            continue
        freed += await trash.purge()
        runs += 1
        log.info("purged an expired trash", trash_run=trash.run_id)
    return runs, freed


async def under_lease(
    storage: Storage,
    name: str,
    work: Callable[[], Awaitable[T]],
    dead_runs: frozenset[str] = frozenset(),
    log: structlog.typing.FilteringBoundLogger | None = None,
) -> T:
    """``work()`` while holding the store's delete lease (never beside a delete run);
    LeaseHeld while another holds it."""
    from daemon.lease import Lease

    lease = Lease(storage, name, log=log)
    await lease.acquire(dead_runs)
    try:
        result = await work()
        if not lease.held():
            raise StorageError(
                f"{name}: the store's lease was lost on the way; run it again to finish"
            )
        return result
    finally:
        await lease.release()
        await storage.remove_empty_dirs([layout.OWN])


async def restore_run(
    storage: Storage,
    run_id: str,
    dead_runs: frozenset[str] = frozenset(),
    log: structlog.typing.FilteringBoundLogger | None = None,
) -> Restored:
    """Put a trashed delete run back, under the lease; TrashGone, LeaseHeld, StorageError."""
    trash = Trash(storage, run_id, log)
    return await under_lease(storage, f"restore-{run_id}", trash.restore, dead_runs, log)


async def purge_now(
    storage: Storage,
    dead_runs: frozenset[str] = frozenset(),
    log: structlog.typing.FilteringBoundLogger | None = None,
) -> tuple[int, int]:
    """``POST /trash/purge``: purge expired trash under the lease; (runs, bytes freed)."""
    log = log or structlog.get_logger()
    return await under_lease(
        storage, "trash-purge", lambda: purge_expired(storage, log), dead_runs, log
    )
