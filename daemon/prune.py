"""The engine: inventory, mark, sweep, delete, as named phases.

Dry-run is a Pruner strategy (as in OpenShift's pruner), not an ``if`` before every delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field
from datetime import datetime
from json.encoder import encode_basestring_ascii as _json_string
from typing import Any, TypeVar

import structlog

from daemon import layout, manifests
from daemon.findings import Finding, Verification
from daemon.inventory import Inventory
from daemon.lease import Lease, LeaseHeld
from daemon.packed import HexSet, PackedCandidates, ShardRecords, SpilledDigests
from daemon.progress import Progress
from daemon.retention import Retention
from daemon.sources.base import Marks, ReadOnlyRefused, ReferenceSource, SourceError
from daemon.storage.base import RUN_LOG, BlobEntry, DeleteFailure, Storage, StorageError
from daemon.trash import Trash, purge_expired, settle_unfinished
from daemon.usage import UsageTally
from daemon.verify import RECOVER, VERIFY, Prior, StoreVerifier
from daemon.verifying import TypedParse

T = TypeVar("T")
BATCH = 1000
#: store clock differences below this are the Date header's resolution, not skew (seconds)
SKEW_RESOLUTION = 2.0
CHECK = "check"
DELETE = "delete"


def _digests(candidates: Iterable[Candidate]) -> AbstractSet[bytes]:
    """The candidates' digests as a set: packed candidates give a sorted 32-byte buffer (a
    set of bytes took ~110 bytes a candidate)."""
    if isinstance(candidates, PackedCandidates):
        return candidates.digests()
    return {c.digest for c in candidates}


def _batch_layers(
    inventory: Inventory, batch: Sequence[Candidate], foreign: dict[bytes, list[str]]
) -> dict[bytes, list[str]]:
    """The _layers link directories of a batch's blobs, found as the batch goes: a dict of
    every doomed blob's links made at once held ~350 bytes a link through the whole delete."""
    layers: dict[bytes, list[str]] = {}
    for name, raw in inventory.layer_links([c.digest for c in batch]):
        layers.setdefault(raw, []).append(layout.layer_link_dir(name, raw.hex()))
    for candidate in batch:
        if candidate.digest in foreign:
            layers.setdefault(candidate.digest, []).extend(foreign[candidate.digest])
    return layers


class Stopped(Exception):
    """The run was asked to stop; partial counts are in the summary."""


class RunFailed(Exception):
    """The run cannot go on; nothing more is deleted."""


@dataclass(frozen=True, slots=True)
class Candidate:
    digest: bytes
    size: int
    path: str

    def document(self) -> dict[str, object]:
        return {"digest": layout.format_digest(self.digest), "size": self.size, "path": self.path}

    def line(self) -> str:
        """``json.dumps(self.document())``, written out: json.dumps cost ~8 us a candidate on
        the event loop (39,800 of them in an untagged check of 50k blobs)."""
        return (
            f'{{"digest": "sha256:{self.digest.hex()}", "size": {int(self.size)}, '
            f'"path": {_json_string(self.path)}}}'
        )


@dataclass(slots=True)
class Summary:
    blobs: int = 0
    bytes: int = 0
    repositories: int = 0
    manifest_links: int = 0
    layer_links: int = 0
    uploads: int = 0
    uploads_kept: int = 0  # younger than the upload age limit
    too_young: int = 0
    failed: int = 0
    tags: int = 0  # untagged/retention runs: tags removed (or that would be)
    manifests: int = 0  # untagged/retention runs: revisions removed (or that would be)
    # trash=<duration> runs: what went to the trash (until trash_until, epoch seconds); what
    # this run freed for good (its deletes without trash, and the expired trash it purged)
    trashed_objects: int = 0
    trashed_bytes: int = 0
    trash_until: int = 0
    freed_bytes: int = 0
    purged_trash_runs: int = 0
    purged_trash_bytes: int = 0

    def document(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RunOptions:
    mode: str = CHECK
    grace: float = 3600.0
    upload_max_age: float = 86400.0
    online: bool = False
    online_settle: float = 2.0  # seconds a racing push gets to register its image
    registry_read_only: bool = False  # from the registry's config, where the source cannot tell
    lease_ttl: float = 60.0  # seconds the store's delete lease lasts without a renewal
    apply: bool = False  # recover: create the ImageStreamMappings, not only list them
    usage: bool = True  # a check also computes per-repository usage (sources that can)
    untagged: bool = False  # also remove revisions no kept tag reaches (daemon/untagged.py)
    #: tags to drop first (daemon/retention.py)
    retention: Retention = field(default_factory=Retention)

    @property
    def revisions_pruned(self) -> bool:
        """An untagged or retention run: tags and revisions may go, not only blobs."""
        return self.untagged or self.retention.active

    trash: float = 0.0  # delete: seconds what it removes is kept in the store's trash; 0 off


class Pruner(ABC):
    """What happens to what the sweep found: nothing (check) or deletion (delete)."""

    @abstractmethod
    async def remove(self, storage: Storage, prefixes: Sequence[str]) -> list[DeleteFailure]:
        """Remove repository trees, revision and layer link directories, upload directories."""

    @abstractmethod
    async def remove_blobs(self, storage: Storage, hexes: Sequence[str]) -> list[DeleteFailure]:
        """Remove blobs."""

    async def remove_tags(self, storage: Storage, prefixes: Sequence[str]) -> list[DeleteFailure]:
        """Remove tag directories and tag history entries (untagged/retention runs); as
        ``remove`` unless a strategy keeps them apart (restore puts tags back last)."""
        return await self.remove(storage, prefixes)


class DryRun(Pruner):
    async def remove(self, storage: Storage, prefixes: Sequence[str]) -> list[DeleteFailure]:
        return []

    async def remove_blobs(self, storage: Storage, hexes: Sequence[str]) -> list[DeleteFailure]:
        return []


class Deleter(Pruner):
    async def remove(self, storage: Storage, prefixes: Sequence[str]) -> list[DeleteFailure]:
        # one call for the whole list: a driver lists and deletes them in parallel batches
        # (on S3 one tree at a time cost two round trips per orphan's layer link)
        return await storage.delete_trees(prefixes)

    async def remove_blobs(self, storage: Storage, hexes: Sequence[str]) -> list[DeleteFailure]:
        return await storage.delete_blobs(hexes)


class Trasher(Pruner):
    """trash=<duration>: whatever a delete removes is moved into the run's trash instead."""

    def __init__(self, trash: Trash) -> None:
        self.trash = trash

    async def remove(self, storage: Storage, prefixes: Sequence[str]) -> list[DeleteFailure]:
        return await self.trash.move_trees(prefixes)

    async def remove_blobs(self, storage: Storage, hexes: Sequence[str]) -> list[DeleteFailure]:
        return await self.trash.move_blobs(hexes)


_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_started_at(text: str) -> float | None:
    """An upload's ``startedat`` (Go RFC3339Nano) -> epoch seconds, None if unreadable."""
    try:
        return datetime.fromisoformat(_FRACTION.sub(r"\1", text.strip())).timestamp()
    except ValueError:
        return None


class Engine:
    """One run over one store with one reference source."""

    # verify and recover (set after construction, like the summary, by whoever records them)
    on_finding: Callable[[Finding], None] = staticmethod(lambda _f: None)
    #: told each revision an untagged/retention run removes (or would): daemon.untagged.Removal
    on_manifest: Callable[[Any], None] = staticmethod(lambda _r: None)
    untagged_plan: Any = None  # daemon.untagged.Plan, once the mark phase made it
    verification: Verification | None = None
    recovery: Any = None  # daemon.recover.Recovered, for recover runs
    #: the typed manifest parse verify trusts (module-level: reader processes run it); the
    #: tests blind it to prove the second reading stands alone
    typed_parse: TypedParse = staticmethod(manifests.parse)

    def __init__(
        self,
        storage: Storage,
        source: ReferenceSource,
        options: RunOptions,
        progress: Progress | None = None,
        stop: asyncio.Event | None = None,
        on_candidate: Callable[[Candidate], None] | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
        run_id: str = "",
        dead_runs: frozenset[str] = frozenset(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dead_runs = dead_runs
        self.clock = clock
        self.run_id = run_id or f"oneshot-{int(time.time())}"
        self.lease: Lease | None = None
        self.storage = storage
        self.source = source
        self.options = options
        self.progress = progress or Progress()
        self.stop = stop or asyncio.Event()
        self.on_candidate = on_candidate or (lambda _c: None)
        self.log = log or structlog.get_logger()
        self.pruner: Pruner = Deleter() if options.mode == DELETE else DryRun()
        #: blobs put back from a dead delete's trash: aged by that run's judgement
        self.aged: set[str] = set()
        #: where a delete moves things aside: its trash, and online mode's parking place
        self.trash = Trash(storage, self.run_id, self.log, clock)
        if options.mode == DELETE and options.trash > 0:
            self.pruner = Trasher(self.trash)
        self.summary = Summary()
        self.notes: list[str] = []
        #: the per-repository usage report of a check, once its sweep is done
        self.usage: dict[str, Any] | None = None
        self.started = clock()
        self.cutoff = self.started - options.grace
        #: the store's clock less ours (0 where the store has no clock of its own)
        self.store_skew = 0.0

    async def run(self) -> Summary:
        """All phases; raises RunFailed, ReadOnlyRefused or Stopped, else the summary."""
        # the driver's retry warnings carry this run's run_id (its tasks inherit the context)
        run_log = RUN_LOG.set(self.log)
        if self.options.mode in (VERIFY, RECOVER):
            try:
                return await self.examine()
            finally:
                RUN_LOG.reset(run_log)
        warm = False
        candidates: Any = None
        try:
            await self._guard()
            self.storage.warm_up()  # after the guard: a refused run starts no helpers
            warm = True
            if self.options.mode == DELETE:
                self.lease = Lease(self.storage, self.run_id, self.options.lease_ttl, log=self.log)
                await self.lease.acquire(self.dead_runs)
                await self._settle_trash()
            # reading phases are cancelled outright on stop: nothing has been changed yet
            inventory = await self._stoppable(self.scan_repositories())
            marks = await self._stoppable(self.mark(inventory))
            if self.options.mode == DELETE and self.options.online:
                # watch from the listing's version at once: a watch started after a long
                # sweep could find that version already compacted away
                await self.source.start_online()
            candidates = await self._stoppable(self.sweep(marks))
            await self.delete(inventory, marks, candidates)
            if self.options.mode == DELETE:
                await self._stoppable(self.verify_kept(inventory, marks, candidates))
        except (SourceError, StorageError, LeaseHeld) as exc:
            raise RunFailed(str(exc)) from exc
        finally:
            if candidates is not None:
                candidates.close()
            if self.lease is not None:
                await self._seal_trash()
                await self.lease.release()
                # nothing of ours stays in the store once a delete run is over but its trash:
                # the lease's directory goes where it is empty
                await self.storage.remove_empty_dirs([layout.OWN])
            if warm:
                self.storage.cool_down()
            RUN_LOG.reset(run_log)
        self.progress.enter("done")
        return self.summary

    async def _settle_trash(self) -> None:
        """Under the lease, before anything is decided: what dead runs left moving aside goes
        back, expired trash is purged, and this run's trash is opened."""
        recovered, self.aged = await settle_unfinished(self.storage, self.run_id, self.log)
        if recovered:
            note = f"put back {recovered} keys that interrupted runs had moved aside"
            self.notes.append(note)
            self.log.warning("put back blobs a stopped run had parked", keys=recovered)
        runs, freed = await purge_expired(self.storage, self.log, self.clock())
        self.summary.purged_trash_runs += runs
        self.summary.purged_trash_bytes += freed
        self.summary.freed_bytes += freed
        if self.options.trash > 0:
            await self.trash.begin(self.options.trash)
            self.summary.trash_until = int(self.clock() + self.options.trash)

    async def _seal_trash(self) -> None:
        """The run is over: its trash says what it holds (a parking place goes)."""
        try:
            doc = await self.trash.seal()
        except StorageError as exc:
            # left "moving": the next delete run puts it back, nothing is lost
            self.log.error("cannot seal this run's trash", error=str(exc))
            self.notes.append(
                f"the trash could not be sealed ({exc}); the next delete run puts its contents back"
            )
            return
        if doc is not None:
            self.summary.trashed_objects = int(doc.get("objects", 0))
            self.summary.trashed_bytes = int(doc.get("bytes", 0))

    async def _stoppable(self, work: Coroutine[Any, Any, T]) -> T:
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise Stopped()
        return task.result()

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped()

    async def _guard(self) -> None:
        self.progress.enter("guard")
        await self.storage.probe()
        self._measure_skew()
        await self.refusal()

    async def refusal(self) -> None:
        """Raise ReadOnlyRefused where this run must not start: known before it does."""
        if self.options.mode != DELETE:
            return
        if self.options.online and self.options.revisions_pruned:
            raise ReadOnlyRefused(
                "untagged and retention deletes are not offered in online mode: a push during "
                "the run could tag a revision this run is removing",
                "put the registry in read-only mode, run the delete without online=true "
                "(--online), then switch it back",
            )
        if self.options.online:
            if self.source.online_refusal:
                raise ReadOnlyRefused(self.source.online_refusal, self.source.online_hint)
            return
        read_only = await self.source.registry_read_only()
        if read_only is None:
            read_only = self.options.registry_read_only
        if not read_only:
            raise ReadOnlyRefused(
                "the registry is not in read-only mode",
                "set it read-only first (OpenShift: spec.readOnly in "
                "configs.imageregistry.operator.openshift.io/cluster; distribution: "
                "storage.maintenance.readonly.enabled), then delete and switch it back; with "
                "the openshift source you may instead ask for online mode (online=true / "
                "--online), which relies on the grace period and on watching images created "
                "during the run",
            )

    def _measure_skew(self) -> None:
        """Modification times come from the store's clock: a store behind ours makes every
        new blob look old. The cutoffs take whichever clock is behind."""
        store_now = self.storage.clock()
        if store_now is None:
            return
        self.store_skew = store_now - self.clock()
        if abs(self.store_skew) < SKEW_RESOLUTION:
            # Date has whole seconds and is stamped before the answer travels: a difference
            # this small is the measurement's own error, not the store's clock (it made
            # blobs written in the last second look too young to a grace=0 check)
            self.store_skew = 0.0
        self.cutoff = self.started + min(0.0, self.store_skew) - self.options.grace
        if abs(self.store_skew) >= 5:
            self.log.warning(
                "the store's clock differs from this host's; the grace period follows the one "
                "behind",
                store_skew_seconds=round(self.store_skew, 1),
            )

    async def scan_repositories(self) -> Inventory:
        """Phase 1: one walk of repositories/ into an inventory."""
        self.progress.enter("scan-repositories")
        # _layers links only serve to unlink deleted blobs: a check neither lists nor keeps
        # them (they are most of the keys under repositories/)
        deleting = self.options.mode == DELETE
        # the storage source's state dir holds the layer links in a file, whole; in memory a
        # prefix of each is enough to find the doomed blobs' links, but online runs remove a
        # repository's scanned links by name, which takes the whole digest
        spills = hasattr(self.source, "spill_dir")
        width = 32 if self.options.online or spills else 8
        records = None
        if deleting and spills:
            records = self._shard_records(width + 4, "registry-pruned-layers-")
        inventory = Inventory(keep_layers=deleting, layer_width=width, layer_records=records)
        if self.options.revisions_pruned or self.options.mode == VERIFY:
            # these read every tag's current/link next: what the listing proves is kept
            self.storage.expect_tag_reads()
        async for batch in self.storage.scan_repositories(layers=deleting):
            for start in range(0, len(batch), 2000):
                inventory.add_keys(batch[start : start + 2000])
                await asyncio.sleep(0)  # status requests get their turn between slices
            self.progress.repositories = len(inventory.repositories)
            self._check_stop()
        for note in self.storage.take_notes():
            self.notes.append(note)
            self.log.warning("scan", note=note)
        self.log.info(
            "repositories scanned",
            repositories=len(inventory.repositories),
            unknown_keys=inventory.unknown,
        )
        return inventory

    async def mark(self, inventory: Inventory) -> Marks:
        """Phase 2: the reference source builds the in-use set."""
        self.progress.enter("mark")
        if self.options.revisions_pruned:
            await self._plan_untagged(inventory)
        repos = inventory.repositories.values()
        self.progress.manifests_total = sum(len(r.revisions) for r in repos)
        self.source.usage_wanted = self.options.mode == CHECK and self.options.usage
        storage = self.storage
        if self.untagged_plan is not None:
            storage = self.untagged_plan.storage_for_mark(storage)
        marks = await self.source.mark(inventory, storage, self.progress)
        self.notes.extend(marks.notes)
        for note in marks.notes:
            self.log.warning("mark", note=note)
        self.log.info("marked", in_use=len(marks.in_use))
        self._check_stop()
        return marks

    async def _plan_untagged(self, inventory: Inventory) -> None:
        """Decide which tags and revisions go; the mark then reads only what stays."""
        from daemon.untagged import Planner

        if self.source.name != "storage":
            raise SourceError(
                f"untagged and retention runs need the storage source, not {self.source.name}"
            )
        planner = Planner(
            self.storage, self.options.retention, self.started, self.log, self.storage.concurrency
        )
        plan = self.untagged_plan = await planner.plan(inventory)
        for note in plan.notes:
            self.notes.append(note)
            self.log.warning("untagged", note=note)
        for repo, tag in plan.dropped:
            inventory.repositories[repo].tags.discard(tag)
        going: dict[str, set[str]] = {}
        for removal in plan.removals:
            going.setdefault(removal.repository, set()).add(removal.hex)
        for name, hexes in going.items():
            # one new set a repository: each discard copied the packed set (5,800 discards
            # cost ~0.15 s at 50k blobs)
            repo = inventory.repositories[name]
            repo.revisions = HexSet(h for h in repo.revisions if h not in hexes)
        self.log.info("untagged planned", tags=len(plan.dropped), manifests=len(plan.removals))

    async def _remove_untagged(self) -> None:
        """Dropped tags, history entries, then revision links, all through the Pruner."""
        from daemon.untagged import Remover

        remover = Remover(
            self.storage,
            self.pruner,
            self.options.mode == DELETE,
            self.log,
            self._count_failures,
            self.on_manifest,
        )
        tags, manifests_ = await remover.apply(self.untagged_plan)
        self.summary.tags += tags
        self.summary.manifests += manifests_
        if remover.failed:
            # the mark left out everything the plan removes: a tag or revision that stayed
            # would name blobs the sweep found unused. No blob goes in this run
            raise RunFailed(
                f"{remover.failed} tag or manifest removals failed (see the log); no blob was "
                "deleted. Run again"
            )
        self._check_stop()

    async def sweep(self, marks: Marks) -> list[Candidate]:
        """Phase 3: every blob not in use is a candidate unless it is too young.

        Returns the candidates to delete; a check reports them on the way and returns none.
        """
        self.progress.enter("sweep")
        # a delete's candidates wait packed, 40 bytes each, in a file of the state dir where
        # there is one (issue 19: memory per blob); a check keeps none and opens no file
        records = (
            self._shard_records(PackedCandidates.RECORD, "registry-pruned-candidates-")
            if self.options.mode == DELETE
            else None
        )
        candidates: Any = PackedCandidates(self._candidate, records)
        shards = iter(layout.SHARDS)
        complete = self.complete_shards = set()
        tally = UsageTally(marks.usage, self.cutoff) if marks.usage is not None else None

        async def worker() -> None:
            for shard in shards:
                self._check_stop()
                # one shard of the in-use set as a plain set: lookups at C speed, and small
                # enough to hand to a driver that filters in another process
                members = marks.in_use.shard(int(shard, 16))
                if tally is None:
                    count, outside = await self.storage.blobs_outside(shard, members)
                else:
                    count, outside, sized = await self.storage.blobs_outside_sized(shard, members)
                    tally.account(int(shard, 16), sized, outside)
                if count - len(outside) == len(members):
                    complete.add(int(shard, 16))  # verify after a delete asks nothing here
                del members
                self.progress.blobs_scanned += count
                self._consider(outside, candidates)
                self.progress.shards_done += 1
                await asyncio.sleep(0)  # status requests get their turn between shards

        await asyncio.gather(*(worker() for _ in range(min(16, self.storage.concurrency))))
        if tally is not None:
            marks.usage = None  # its pairs were taken shard by shard
            self.usage = tally.document((self.progress.candidates, self.progress.candidate_bytes))
        self.log.info(
            "swept",
            blobs=self.progress.blobs_scanned,
            candidates=self.progress.candidates,
            too_young=self.summary.too_young,
        )
        return candidates

    def _candidate(self, raw: bytes, size: int) -> Candidate:
        return Candidate(raw, size, self.storage.location(layout.blob_data(raw.hex())))

    def _linked_blob(self, hexdigest: str) -> None:
        """A blob not in use whose directory is reached through a symbolic link: a delete
        would remove what the link points to, which may belong to another store. Kept."""
        note = (
            f"{self.storage.location(layout.blob_dir(hexdigest))} is not in use but is reached "
            "through a symbolic link: never deleted through a link (remove it by hand if "
            "nothing else uses its target)"
        )
        self.notes.append(note)
        self.log.warning("sweep", note=note)

    def _consider(self, outside: Sequence[BlobEntry], out: Any) -> None:
        """One shard's blobs outside the in-use set: each too young, or a candidate that a
        check reports at once and a delete keeps. One loop, its lookups hoisted: an untagged
        check meets ~40,000 of them at 50k blobs, and per call this cost ~8 us a candidate."""
        cutoff, aged, location = self.cutoff, self.aged, self.storage.location
        mode, report, info = self.options.mode, self.on_candidate, self.log.info
        young = found = found_bytes = 0
        for entry in outside:
            hexdigest, size, mtime = entry.hex, entry.size, entry.mtime
            if entry.linked:
                self._linked_blob(hexdigest)
                continue
            # a blob directory without data is a blob being written: never a candidate. One a
            # dead delete had moved aside and this run put back is as old as that run found it
            if size is None or mtime is None or (mtime > cutoff and hexdigest not in aged):
                young += 1
                continue
            path = location(layout.blob_data(hexdigest))
            candidate = Candidate(bytes.fromhex(hexdigest), size, path)
            found += 1
            found_bytes += size
            if mode == DELETE:
                # a check reports each candidate as it is found and keeps none of them
                out.append(candidate)
            elif mode == CHECK:
                report(candidate)
                # %-style: the line is only formatted when info is logged (once per candidate)
                info("Would delete blob: sha256:%s", hexdigest)
        # counted once a shard (nothing awaits in between: no reader sees a shard half done)
        self.summary.too_young += young
        self.progress.too_young += young
        self.progress.candidates += found
        self.progress.candidate_bytes += found_bytes
        if mode == CHECK:
            self.summary.blobs += found
            self.summary.bytes += found_bytes

    async def delete(self, inventory: Inventory, marks: Marks, candidates: list[Candidate]) -> None:
        """Phase 4: repositories and manifest links, stale uploads, then blobs in batches."""
        self.progress.enter("delete" if self.options.mode == DELETE else "report")
        self._check_lease()
        if self.untagged_plan is not None:
            await self._remove_untagged()
        await self._remove_repositories(inventory, marks)
        await self._remove_uploads(inventory)
        if not candidates or self.options.mode == CHECK:
            inventory.drop_layers()
            return
        foreign: dict[bytes, list[str]] = {}
        if any(repo.foreign_layers for repo in inventory.repositories.values()):
            doomed = _digests(candidates)
            await self._foreign_layer_links(inventory, doomed, foreign)
            del doomed
        # two batches in flight: one's links go while the other's blobs go, so the store is
        # not idle while the slowest request of a batch finishes. Online runs wait on the
        # source between steps and keep one batch at a time
        window = 1 if self.options.online else 2
        running: set[asyncio.Task[None]] = set()
        try:
            for start in range(0, len(candidates), BATCH):
                while len(running) >= window:
                    done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    errors = [task.exception() for task in done]  # each one retrieved
                    first = next((e for e in errors if e is not None), None)
                    if first is not None:
                        raise first
                self._check_stop()
                self._check_lease()
                batch = candidates[start : start + BATCH]
                layers = _batch_layers(inventory, batch, foreign)
                running.add(asyncio.create_task(self._delete_batch(batch, layers)))
        finally:
            # what is in flight finishes and is counted, whatever ended the loop
            results = await asyncio.gather(*running, return_exceptions=True)
            inventory.drop_layers()
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if self.summary.failed:
            raise RunFailed(
                f"{self.summary.failed} deletes failed (see the log); "
                f"{self.summary.blobs} blobs were deleted; run again to finish"
            )

    async def _foreign_layer_links(
        self, inventory: Inventory, doomed: set[bytes], layers: dict[bytes, list[str]]
    ) -> None:
        """Add the sha384/sha512 layer links that stand for a doomed blob: they go with it
        (a link whose blob is kept stays, and so does one that cannot be read)."""
        dirs = [
            layout.foreign_layer_link_dir(repo.name, digest)
            for repo in inventory.repositories.values()
            for digest in repo.foreign_layers
        ]
        for start in range(0, len(dirs), BATCH):
            part = dirs[start : start + BATCH]
            named = await self.storage.read_parsed(
                [d + "link" for d in part], 1024, layout.link_digest
            )
            for prefix, raw in zip(part, named, strict=True):
                if isinstance(raw, bytes) and raw in doomed:
                    layers.setdefault(raw, []).append(prefix)

    def _check_lease(self) -> None:
        """Nothing more is deleted once the lease is lost, or may have expired for others."""
        if self.lease is not None and not self.lease.held():
            raise RunFailed(
                "this run lost the store's delete lease (taken over, or not renewed within "
                f"{self.lease.ttl:g}s); stopped deleting. Run again"
            )

    async def _delete_batch(self, batch: list[Candidate], layers: dict[bytes, list[str]]) -> None:
        """One batch: its blobs' layer links first, then the blobs whose links all went."""
        links = [p for c in batch for p in layers.get(c.digest, ())]
        failures = await self.pruner.remove(self.storage, links)
        failed_links = {f.key for f in failures}
        self.summary.layer_links += len(links) - len(failed_links)
        # a blob whose link could not be removed stays, so no link ever dangles
        batch = [c for c in batch if not failed_links.intersection(layers.get(c.digest, ()))]
        self._count_failures(failures)
        if self.options.online:
            batch, failures = await self._delete_online(batch, layers)
        else:
            hexes = [c.digest.hex() for c in batch]
            failures = await self.pruner.remove_blobs(self.storage, hexes)
        failed = {f.key for f in failures}  # hex digests
        for candidate in batch:
            if candidate.digest.hex() in failed:
                continue
            self.summary.blobs += 1
            self.summary.bytes += candidate.size
            if not self.options.trash:
                self.summary.freed_bytes += candidate.size
            self.progress.deleted += 1
            self.progress.deleted_bytes += candidate.size
            self.on_candidate(candidate)
            self.log.info("Deleted blob: sha256:%s", candidate.digest.hex())
        self._count_failures(failures)
        if self.options.online:
            await self._aftercheck(batch)

    def _count_failures(self, failures: list[DeleteFailure]) -> None:
        for failure in failures:
            if failure.kept:
                note = f"{self.storage.location(failure.key)} kept: {failure.reason}"
                self.notes.append(note)
                self.log.warning("kept", note=note)
                continue
            self.summary.failed += 1
            self.progress.errors += 1
            self.log.error("delete failed", key=failure.key, reason=failure.reason)

    async def _delete_online(
        self, batch: list[Candidate], layers: dict[bytes, list[str]]
    ) -> tuple[list[Candidate], list[DeleteFailure]]:
        """Online mode, once the batch's layer links are gone: park, settle, re-check, delete.

        A push that looks for a parked blob uploads it again or fails; one that found it just
        before registers its image within the settle time, and gets the blob and links back.
        """
        trash = self.trash
        await trash.begin(self.options.trash)  # without trash: a parking place only
        hexes = [c.digest.hex() for c in batch]
        moved, failed = await trash.park(hexes)
        if failed:
            # a move that fails (a copy the store refuses) puts back what was parked
            await trash.put_back([layout.blob_data(h) for h in moved])
            await self._restore_links(batch, layers)
            raise StorageError(f"cannot park blob {failed[0].key}: {failed[0].reason}")
        parked = set(moved)
        await asyncio.sleep(self.options.online_settle)
        try:
            protected = await self.source.newly_in_use(c.digest for c in batch)
        except SourceError:
            try:
                # unsure: everything goes back
                await trash.put_back([layout.blob_data(h) for h in sorted(parked)])
            finally:
                await self._restore_links(batch, layers)
            raise
        back = [c for c in batch if c.digest in protected]
        await trash.put_back(
            [layout.blob_data(c.digest.hex()) for c in back if c.digest.hex() in parked]
        )
        await self._restore_links(back, layers)
        for candidate in back:
            self.summary.too_young += 1
            self.progress.too_young += 1
            self.log.warning("kept: referenced during the run", digest=candidate.digest.hex())
        doomed = [c for c in batch if c.digest not in protected and c.digest.hex() in parked]
        if self.options.trash:
            return doomed, []  # they stay in the trash
        dropped = await trash.drop([layout.blob_data(c.digest.hex()) for c in doomed])
        return doomed, [DeleteFailure(f.key.rsplit("/", 2)[-2], f.reason) for f in dropped]

    async def _restore_links(
        self, candidates: list[Candidate], layers: dict[bytes, list[str]]
    ) -> None:
        """Write back the layer links this batch removed for ``candidates``."""
        for candidate in candidates:
            for prefix in layers.get(candidate.digest, ()):
                await self.storage.write(
                    prefix + "link", f"sha256:{candidate.digest.hex()}".encode()
                )
                self.summary.layer_links -= 1

    async def _aftercheck(self, deleted: list[Candidate]) -> None:
        """Online mode: an image that names a blob just deleted means a push won the race."""
        # a push that found the blob parked uploaded it again: those are whole
        late = await self._missing(await self.source.newly_in_use(c.digest for c in deleted))
        if late:
            # the push may be uploading it again right now: give it the settle time too
            await asyncio.sleep(self.options.online_settle)
            late = await self._missing(late)
        if late:
            names = ", ".join(layout.format_digest(d) for d in sorted(late)[:10])
            raise RunFailed(
                f"{len(late)} deleted blobs are referenced by images created during the run "
                f"({names}); push those images again. Stopped before deleting more"
            )

    async def _missing(self, digests: Iterable[bytes]) -> list[bytes]:
        """Those of ``digests`` whose blob data is not in the store."""
        digests = list(digests)
        stats = await self.storage.stat_many([layout.blob_data(d.hex()) for d in digests])
        return [d for d, entry in zip(digests, stats, strict=True) if entry is None]

    # -- verify and recover ---------------------------------------------------------------

    async def examine(self) -> Summary:
        """A verify or recover run: the repositories walk, then that phase; nothing deleted."""
        warm = False
        try:
            await self._guard()
            self.storage.warm_up()
            warm = True
            inventory = await self._stoppable(self.scan_repositories())
            if self.options.mode == RECOVER:
                from daemon.recover import Recovery

                recovery = Recovery(
                    self.storage,
                    self.source,
                    self.progress,
                    self.on_finding,
                    apply=self.options.apply,
                    log=self.log,
                    workers=self.storage.concurrency,
                )
                self.recovery = recovery.result
                await self._stoppable(recovery.run(inventory))
                recovery.verdict()
            else:
                await self._stoppable(self.verify_all(inventory))
        except (SourceError, StorageError) as exc:
            raise RunFailed(str(exc)) from exc
        finally:
            if warm:
                self.storage.cool_down()
        self.progress.enter("done")
        return self.summary

    async def verify_all(self, inventory: Inventory) -> None:
        """mode=verify: the reading of the run's source (storage, or the cluster's images)."""
        if self.source.name == "openshift":
            from daemon.verify_openshift import OpenShiftVerifier

            verifier: Any = OpenShiftVerifier(
                self.storage,
                self.source,
                self.progress,
                self.on_finding,
                log=self.log,
                workers=self.storage.concurrency,
            )
        else:
            verifier = self._store_verifier()
        await self._verify_with(verifier, inventory)

    async def verify_kept(
        self, inventory: Inventory, marks: Marks, candidates: list[Candidate]
    ) -> None:
        """After a delete: every kept image whole, from what the run already listed."""
        deleted: Any = None
        if isinstance(candidates, PackedCandidates):
            # packed candidates are forgotten as their digests go to a file of the state
            # dir, read back only for the rare loose digest strings (issue 19)
            deleted = SpilledDigests(self._shard_records(32, "registry-pruned-records-"))
            candidates.digests_into(deleted)
        prior = Prior(
            in_use=marks.in_use,
            complete=frozenset(getattr(self, "complete_shards", ())),
            deleted=deleted if deleted is not None else _digests(candidates),
            removed_repositories=set(marks.remove_repositories),
            removed_revisions=set(marks.remove_revisions),
            tags=self.source.name != "openshift",
        )
        try:
            await self._verify_with(self._store_verifier(prior), inventory)
        finally:
            if deleted is not None:
                deleted.close()

    def _shard_records(self, width: int, prefix: str) -> ShardRecords:
        """Records by shard, in a file of the state dir where the source has one (the storage
        source), else in memory."""
        return ShardRecords(
            width,
            spill=hasattr(self.source, "spill_dir"),
            directory=getattr(self.source, "spill_dir", None),
            prefix=prefix,
        )

    def _store_verifier(self, prior: Prior | None = None) -> StoreVerifier:
        return StoreVerifier(
            self.storage,
            self.progress,
            self.on_finding,
            log=self.log,
            workers=self.storage.concurrency,
            typed=self.typed_parse,
            prior=prior,
            # a delete's wanted blobs wait where the storage source spilled its in-use set
            # (the state dir): issue 19's memory; the openshift source has no such dir
            spill=prior is not None and hasattr(self.source, "spill_dir"),
            spill_dir=getattr(self.source, "spill_dir", None),
        )

    async def _verify_with(self, verifier: Any, inventory: Inventory) -> None:
        self.verification = verifier.result
        await verifier.run(inventory)
        self._verdict()

    def _verdict(self) -> None:
        found = self.verification
        if found is None or found.passed:
            return
        names = ", ".join(found.examples)
        more = (
            f" and {found.broken - len(found.examples)} more"
            if found.broken > len(found.examples)
            else ""
        )
        what = "verification after the delete" if found.after_delete else "verification"
        raise RunFailed(
            f"{what} found {found.broken} broken images: {names}{more}; "
            "see GET /runs/<id>/broken (or the Broken lines) for what each one misses"
        )

    async def _remove_repositories(self, inventory: Inventory, marks: Marks) -> None:
        online = self.options.online and self.options.mode == DELETE
        doomed = list(marks.remove_repositories)
        if online and doomed:
            doomed = await self._recheck_repositories(inventory, doomed)
        for name in doomed:
            if online:
                # only what the scan saw: a link a push wrote since then is not ours to judge
                prefixes = self._scanned_links(inventory, name)
                if not prefixes:
                    continue  # emptied by an earlier online run: nothing of it is left
            else:
                prefixes = [
                    layout.repository_root(name) + section
                    for section in ("_manifests/", "_layers/", "_uploads/")
                ]
            failures = await self.pruner.remove(self.storage, prefixes)
            self._count_failures(failures)
            if not failures:
                self.summary.repositories += 1
                verb = "Deleted" if self.options.mode == DELETE else "Would delete"
                self.log.info(f"{verb} repository: {name}")
        self._check_stop()
        removed = set(marks.remove_repositories)
        revisions = [(r, h) for r, h in marks.remove_revisions if r not in removed]
        if self.options.online and self.options.mode == DELETE and revisions:
            # an image pushed since the listing may own a link we were about to remove
            protected = await self.source.newly_in_use(bytes.fromhex(h) for _r, h in revisions)
            revisions = [(r, h) for r, h in revisions if bytes.fromhex(h) not in protected]
        links = [layout.revision_dir(repo, hexdigest) for repo, hexdigest in revisions]
        failures = await self.pruner.remove(self.storage, links)
        self._count_failures(failures)
        self.summary.manifest_links += len(links) - len(failures)

    async def _recheck_repositories(self, inventory: Inventory, names: list[str]) -> list[str]:
        """Online mode: drop from ``names`` the repositories referenced since the listing."""
        kept = await self.source.repositories_now_in_use(names)
        # an image created since the listing whose manifest is one of a repository's
        # revisions: its push is done, its stream may lag behind
        for name in names:
            repo = inventory.repositories.get(name)
            if name in kept or repo is None or not repo.revisions:
                continue
            if await self.source.newly_in_use(bytes.fromhex(h) for h in repo.revisions):
                kept.add(name)
        for name in sorted(kept):
            self.log.warning("repository kept: referenced during the run", repository=name)
        return [name for name in names if name not in kept]

    @staticmethod
    def _scanned_links(inventory: Inventory, name: str) -> list[str]:
        """The link directories of ``name`` that the scan found (uploads age out on their own)."""
        repo = inventory.repositories.get(name)
        if repo is None:
            return []
        root = layout.repository_root(name)
        return [
            *(layout.revision_dir(name, h) for h in sorted(repo.revisions)),
            *(f"{root}_manifests/tags/{tag}/" for tag in sorted(repo.tags)),
            *(layout.layer_link_dir(name, raw.hex()) for raw in inventory.layer_digests(name)),
        ]

    async def _remove_uploads(self, inventory: Inventory) -> None:
        # startedat is the registry's clock, data's mtime the store's: the one behind counts
        limit = self.started + min(0.0, self.store_skew) - self.options.upload_max_age
        stale: list[str] = []
        for repo in inventory.repositories.values():
            for uuid in repo.uploads:
                prefix = layout.upload_dir(repo.name, uuid)
                started = None
                if uuid in repo.uploads_started:
                    try:
                        text = await self.storage.read(prefix + "startedat", 1024)
                        started = parse_started_at(text.decode("ascii", "replace"))
                    except StorageError:
                        started = None
                if started is None:
                    entry = await self.storage.stat(prefix + "data")
                    started = entry.mtime if entry else None
                if started is not None and started < limit:
                    stale.append(prefix)
                else:
                    self.summary.uploads_kept += 1
        failures = await self.pruner.remove(self.storage, stale)
        self._count_failures(failures)
        self.summary.uploads += len(stale) - len(failures)
