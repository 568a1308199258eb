"""Run manager: one active run at a time, history persisted in the state directory."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import structlog

from daemon.atomic import atomic_write
from daemon.config import Settings
from daemon.findings import Finding, Verification
from daemon.progress import Progress
from daemon.prune import DELETE, Candidate, Engine, RunFailed, RunOptions, Stopped, Summary
from daemon.sources import open_source
from daemon.sources.base import ReadOnlyRefused, ReferenceSource, SourceError
from daemon.storage.base import Storage, StorageError
from daemon.trash import TrashGone, restore_run

RUNNING, SUCCEEDED, FAILED, STOPPED, INTERRUPTED, RESTORED = (
    "running",
    "succeeded",
    "failed",
    "stopped",
    "interrupted",
    "restored",  # a trashed delete run put back
)
FINAL = (SUCCEEDED, FAILED, STOPPED, INTERRUPTED, RESTORED)
#: opens a reference source by name, logging through the given (run-bound) logger
SourceFactory = Callable[[str, structlog.typing.FilteringBoundLogger], Awaitable[ReferenceSource]]


class Busy(Exception):
    """A run is already active."""

    def __init__(self, active: str) -> None:
        super().__init__(f"run {active} is still active; stop it or wait for it to end")
        self.active = active


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class Run:
    id: str
    mode: str
    source: str
    options: RunOptions
    state: str = RUNNING
    started_at: str = field(default_factory=_now)
    finished_at: str | None = None
    error: str | None = None
    progress: Progress = field(default_factory=Progress)
    summary: Summary = field(default_factory=Summary)
    notes: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    started_mono: float = field(default_factory=time.monotonic)
    duration: float | None = None
    saved: dict[str, Any] | None = None  # a run loaded from history
    verification: Verification | None = None  # verify runs, and delete runs once verified
    recovery: Any = None  # recover runs: daemon.recover.Recovered

    def estimate(self, elapsed: float | None = None) -> tuple[float, float | None]:
        """``fraction`` (0..1) and ``eta_seconds`` (None while unknown or once ended)."""
        if elapsed is None:
            elapsed = time.monotonic() - self.started_mono
        deleting = self.mode == "delete"
        if self.state == SUCCEEDED:
            return 1.0, 0.0
        fraction = self.progress.fraction(deleting)
        if self.state != RUNNING:
            return fraction, None
        return fraction, self.progress.eta(elapsed, deleting)

    def document(self) -> dict[str, Any]:
        if self.saved is not None:
            return self.saved
        progress = self.progress.snapshot()
        elapsed = (
            self.duration if self.duration is not None else time.monotonic() - self.started_mono
        )
        progress["elapsed_seconds"] = round(elapsed, 3)
        if elapsed > 0:
            progress["blobs_per_second"] = round(self.progress.blobs_scanned / elapsed, 1)
        progress["fraction"], progress["eta_seconds"] = self.estimate(elapsed)
        return {
            "id": self.id,
            "mode": self.mode,
            "source": self.source,
            "state": self.state,
            "phase": self.progress.phase,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "grace_seconds": self.options.grace,
            "upload_max_age_seconds": self.options.upload_max_age,
            "online": self.options.online,
            **self._revision_options(),
            "trash_seconds": self.options.trash,
            "progress": progress,
            "summary": self.summary.document(),
            "notes": self.notes[:100],
            "error": self.error,
            **self._findings(),
        }

    def _revision_options(self) -> dict[str, Any]:
        """untagged/retention runs say so (other runs' documents stay as they were)."""
        if not self.options.revisions_pruned:
            return {}
        return {"untagged": self.options.untagged, "retention": self.options.retention.document()}

    def _findings(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        if self.verification is not None:
            found["verification"] = self.verification.document()
        if self.recovery is not None:
            found["recovery"] = self.recovery.document()
        return found


class RunManager:
    """Starts runs, keeps their documents and candidate lists, one run at a time."""

    def __init__(
        self,
        storage: Storage,
        sources: SourceFactory,
        state_dir: Path,
        history: int = 50,
        log: structlog.typing.FilteringBoundLogger | None = None,
        on_finish: Callable[[Run], None] | None = None,
        log_end_as_problem: bool = True,
        on_finding: Callable[[Finding], None] | None = None,
    ) -> None:
        #: told each broken image or lost manifest as a run finds it (the CLI prints them)
        self.on_finding = on_finding or (lambda _finding: None)
        #: a one-shot CLI run prints its own end in the pruner's words: there a failure
        #: logged again would make a one-line cause two lines
        self.log_end_as_problem = log_end_as_problem
        self.storage = storage
        self.sources = sources
        self.dir = Path(state_dir) / "runs"
        self.history = max(1, history)
        self.log = log or structlog.get_logger()
        self.on_finish = on_finish or (lambda _run: None)
        self.runs: dict[str, Run] = {}
        self.active: Run | None = None
        self._task: asyncio.Task[None] | None = None

    # -- history -----------------------------------------------------------------------

    async def load(self) -> None:
        """Read the history; a run recorded as running died with its daemon: interrupted."""
        await asyncio.to_thread(self.dir.mkdir, parents=True, exist_ok=True)
        for doc in await asyncio.to_thread(self._read_all):
            await self._settle(doc)
            self._remember(doc)

    async def _settle(self, doc: dict[str, Any]) -> None:
        """A run recorded as running whose process holds no lock on it died: interrupted."""
        if doc.get("state") != RUNNING or await asyncio.to_thread(_held, self.lock_path(doc["id"])):
            return
        doc["state"] = INTERRUPTED
        doc["finished_at"] = doc.get("finished_at") or _now()
        doc["error"] = "the process running it stopped while it was running"
        await self._save_doc(doc)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.lock_path(doc["id"]).unlink)
        self.log.warning("run interrupted by a restart", run_id=doc["id"])

    def _remember(self, doc: dict[str, Any]) -> None:
        run = Run(
            doc["id"],
            doc.get("mode", ""),
            doc.get("source", ""),
            RunOptions(),
            state=doc["state"],
            saved=doc,
        )
        self.runs[run.id] = run

    async def refresh(self) -> None:
        """Take in runs another process (a one-shot CLI run) recorded in the state directory
        since, and their ends; this process's own runs are its own to record."""
        known = {r.id: r.state for r in self.runs.values() if r.saved is None}
        seen = {r.id: r.saved for r in self.runs.values() if r.saved is not None}
        for doc in await asyncio.to_thread(self._read_all, False):
            # a run of ours that another process restored since: its document says so now
            if doc["id"] in known and not (doc.get("state") == RESTORED != known[doc["id"]]):
                continue
            if doc != seen.get(doc["id"]) or doc.get("state") == RUNNING:
                # a running one may have lost its process since: settle it again
                await self._settle(doc)
                self._remember(doc)

    async def follow(self, every: float = 2.0) -> None:
        """``refresh`` forever (the daemon's background task)."""
        while True:
            await asyncio.sleep(every)
            try:
                await self.refresh()
            except OSError as exc:
                self.log.warning("cannot read the state directory", error=str(exc))

    def _read_all(self, set_aside: bool = True) -> list[dict[str, Any]]:
        docs = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                doc = json.loads(path.read_text())
                if isinstance(doc, dict) and isinstance(doc.get("id"), str):
                    docs.append(doc)
            except FileNotFoundError:
                continue  # pruned from the history by another process meanwhile
            except (OSError, ValueError):
                # a torn file cannot come from our atomic writes; keep it aside for a person
                if set_aside:
                    with contextlib.suppress(OSError):
                        path.rename(path.with_suffix(".corrupt"))
        return docs

    async def _save_doc(self, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, indent=1).encode()
        await asyncio.to_thread(atomic_write, self.dir / f"{doc['id']}.json", data)

    async def _save(self, run: Run) -> None:
        try:
            await self._save_doc(run.document())
        except OSError as exc:
            # the run goes on; its document stays in memory and is saved again later
            self.log.error("cannot save run document", run_id=run.id, error=str(exc))

    def lock_path(self, run_id: str) -> Path:
        return self.dir / f"{run_id}.lock"

    def candidates_path(self, run_id: str) -> Path:
        return self.dir / f"{run_id}.candidates.ndjson"

    def manifests_path(self, run_id: str) -> Path:
        """Revisions an untagged/retention run removes (or would): GET /runs/<id>/manifests."""
        return self.dir / f"{run_id}.manifests.ndjson"

    def findings_path(self, run_id: str) -> Path:
        """Broken images (verify, and delete runs' verification) or lost manifests (recover)."""
        return self.dir / f"{run_id}.findings.ndjson"

    def usage_path(self, run_id: str) -> Path:
        # not *.json: load() reads those as run documents
        return self.dir / f"{run_id}.usage"

    async def _save_usage(self, run_id: str, usage: dict[str, Any]) -> None:
        data = json.dumps({"run_id": run_id, **usage}, separators=(",", ":")).encode()
        try:
            await asyncio.to_thread(atomic_write, self.usage_path(run_id), data)
        except OSError as exc:
            # the check itself is sound; only its usage report is missing
            self.log.error("cannot save the usage report", run_id=run_id, error=str(exc))

    async def _prune_history(self) -> None:
        finished = [r for r in self.ordered() if r.state in FINAL]
        for old in finished[self.history :]:
            self.runs.pop(old.id, None)
            for path in (
                self.dir / f"{old.id}.json",
                self.candidates_path(old.id),
                self.lock_path(old.id),
                self.findings_path(old.id),
                self.manifests_path(old.id),
                self.usage_path(old.id),
            ):
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(path.unlink)

    # -- queries -----------------------------------------------------------------------

    def ordered(self) -> list[Run]:
        return sorted(self.runs.values(), key=lambda r: r.id, reverse=True)

    def resolve(self, run_id: str) -> str:
        """The id ``run_id`` stands for now: ``latest`` is the newest run's (itself if none)."""
        if run_id == "latest":
            ordered = self.ordered()
            return ordered[0].id if ordered else run_id
        return run_id

    def get(self, run_id: str) -> Run | None:
        return self.runs.get(self.resolve(run_id))

    def _repositories_last_seen(self) -> int:
        """Repositories the newest finished run found: how far a scan is, for the ETA."""
        for run in self.ordered():
            if run.state in FINAL:
                found = run.document().get("progress", {}).get("repositories", 0)
                if isinstance(found, int) and found > 0:
                    return found
        return 0

    # -- running -----------------------------------------------------------------------

    async def start(self, mode: str, source: str, options: RunOptions) -> Run:
        """Record and start a run; Busy while one is active, ReadOnlyRefused (and nothing
        recorded) where the run must not start at all."""
        if self.active is not None:
            raise Busy(self.active.id)
        await self._refusal(source, options)
        if self.active is not None:  # another start won the race while we asked
            raise Busy(self.active.id)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")  # ids sort by start time
        run = Run(f"{stamp}-{uuid.uuid4().hex[:6]}", mode, source, options)
        # held while this process runs it, taken before the run is recorded: another process
        # that shares the state directory (a daemon next to a one-shot run) tells a live run
        # from one whose process died by this lock
        alive = await asyncio.to_thread(_hold, self.lock_path(run.id))
        run.progress.repositories_expected = self._repositories_last_seen()
        self.runs[run.id] = run
        self.active = run
        await self._save(run)
        self._task = asyncio.create_task(self._execute(run, alive))
        return run

    async def _refusal(self, source_name: str, options: RunOptions) -> None:
        """A refusal is no run: ask the guard before anything is recorded."""
        if options.mode != DELETE:
            return
        try:
            source = await self.sources(source_name, self.log)
        except (SourceError, StorageError):
            return  # the run itself fails with this error, where the user can read it
        try:
            await Engine(self.storage, source, options, log=self.log).refusal()
        except SourceError:
            return  # not a refusal: the run's own guard meets it again and fails visibly
        finally:
            with contextlib.suppress(Exception):
                await source.close()

    async def _execute(self, run: Run, alive: IO[bytes]) -> None:
        log = self.log.bind(run_id=run.id, mode=run.mode, source=run.source)
        buffer: list[str] = []
        path = self.candidates_path(run.id)

        written = asyncio.Lock()  # candidate lines reach their file in the order found
        early: set[asyncio.Task[None]] = set()

        async def write_candidates() -> None:
            async with written:
                if buffer:
                    lines = "\n".join(buffer) + "\n"
                    buffer.clear()
                    await asyncio.to_thread(_append, path, lines)

        async def write_early() -> None:
            try:
                await write_candidates()
            except OSError as exc:
                state_error.append(f"cannot write the state directory {self.dir}: {exc}")
                run.stop.set()

        def on_candidate(candidate: Candidate) -> None:
            buffer.append(candidate.line())
            # a sweep finds tens of thousands a second: a second's lines, their join and its
            # encoding were 15-25 MB at a 1M filesystem check's peak (issue 19); written a
            # few thousand at a time instead
            if len(buffer) >= _CANDIDATE_LINES and not early:
                task = asyncio.ensure_future(write_early())
                early.add(task)
                task.add_done_callback(early.discard)

        findings: list[str] = []
        findings_path = self.findings_path(run.id)

        def on_finding(finding: Finding) -> None:
            findings.append(json.dumps(finding.document()))
            self.on_finding(finding)

        removed: list[str] = []
        manifests_path = self.manifests_path(run.id)

        def on_manifest(removal: Any) -> None:
            removed.append(json.dumps(removal.document()))

        async def flush() -> None:
            if removed:
                lines = "\n".join(removed) + "\n"
                removed.clear()
                await asyncio.to_thread(_append, manifests_path, lines)
            await write_candidates()
            if findings:
                lines = "\n".join(findings) + "\n"
                findings.clear()
                await asyncio.to_thread(_append, findings_path, lines)

        async def saver() -> None:
            while True:
                await asyncio.sleep(1.0)
                try:
                    await flush()
                    await self._save_doc(run.document())
                except OSError as exc:
                    # a run whose record cannot be kept must not go on deleting
                    state_error.append(f"cannot write the state directory {self.dir}: {exc}")
                    run.stop.set()
                    return

        await asyncio.to_thread(_append, path, "")
        await asyncio.to_thread(_append, findings_path, "")
        if run.options.revisions_pruned:
            await asyncio.to_thread(_append, manifests_path, "")
        source: ReferenceSource | None = None
        background = asyncio.create_task(saver())
        state, error = FAILED, None
        state_error: list[str] = []
        try:
            source = await self.sources(run.source, log)
            engine = Engine(
                self.storage,
                source,
                run.options,
                run.progress,
                run.stop,
                on_candidate,
                log,
                run_id=run.id,
                # a run this daemon recorded as interrupted died holding the store's lease:
                # its successor may take the lease over instead of waiting for it to expire
                dead_runs=self.dead_runs(),
            )
            engine.summary = run.summary
            engine.on_finding = on_finding
            engine.on_manifest = on_manifest
            log.info(
                "run started",
                grace=run.options.grace,
                online=run.options.online,
                store=self.storage.description,
            )
            try:
                await engine.run()
                state = SUCCEEDED
            finally:
                run.notes = engine.notes
                run.verification, run.recovery = engine.verification, engine.recovery
            if engine.usage is not None:
                await self._save_usage(run.id, engine.usage)
        except Stopped:
            state = STOPPED
        except (RunFailed, ReadOnlyRefused, SourceError, StorageError) as exc:
            error = str(exc)
        except asyncio.CancelledError:
            state, error = STOPPED, "the daemon shut down"
        except Exception as exc:  # a bug must end the run, not the daemon
            log.exception("run crashed")
            error = f"internal error: {exc!r}"
        finally:
            background.cancel()
            if source is not None:
                with contextlib.suppress(Exception):
                    await source.close()
            try:
                await flush()
            except OSError as exc:
                state_error.append(f"cannot write the state directory {self.dir}: {exc}")
            if state_error:
                state, error = FAILED, state_error[0]
                log.error("state directory", error=error)
            # the final state and the end of "active" become visible together: a client
            # that sees the run ended may start the next one at once
            run.duration = time.monotonic() - run.started_mono
            run.finished_at = _now()
            run.state, run.error = state, error
            # logged as the end becomes visible, in one step: whoever sees it can read this
            # line. A stopped run is worth a look, a failed one needs one
            ended = {STOPPED: log.warning, FAILED: log.error}.get(run.state, log.info)
            if not self.log_end_as_problem:
                ended = log.info
            ended(
                "run ended",
                state=run.state,
                error=run.error,
                seconds=round(run.duration, 3),
                **run.summary.document(),
            )
            self.active = None
            await self._save(run)
            await self._prune_history()  # before waiters see the end: they may list files
            alive.close()
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.lock_path(run.id).unlink)
            run.done.set()
            self.on_finish(run)

    async def stop(self, run: Run) -> None:
        run.stop.set()

    # -- the trash -----------------------------------------------------------------------

    def dead_runs(self) -> frozenset[str]:
        """Runs recorded as interrupted: they died holding the store's lease, perhaps."""
        return frozenset(r.id for r in self.runs.values() if r.state == INTERRUPTED)

    async def restore(self, run_id: str) -> Run:
        """Put a trashed delete run back and record it in its document: TrashGone (nothing
        to restore), Busy (a run is active here), LeaseHeld, StorageError."""
        run = self.get(run_id)
        if run is None:
            raise KeyError(run_id)
        if self.active is not None:
            raise Busy(self.active.id)
        doc = dict(run.document())
        if doc.get("mode") != DELETE or not doc.get("trash_seconds"):
            raise TrashGone(
                f"run {run.id} is a {doc.get('mode')} run without trash: nothing was kept to "
                "restore (delete with trash=<duration> to be able to undo)"
            )
        if doc.get("state") == RUNNING:
            raise TrashGone(f"run {run.id} is still running; stop it first")
        result = await restore_run(self.storage, run.id, self.dead_runs(), self.log)
        if doc.get("state") != RESTORED:
            doc["state_before_restore"] = doc.get("state")
        doc["state"] = RESTORED
        doc["restore"] = {
            "restored_at": doc.get("restore", {}).get("restored_at") or _now(),
            **result.document(),
        }
        run.saved, run.state = doc, RESTORED
        await self._save_doc(doc)
        self.log.info("run restored", run_id=run.id, **result.document())
        return run

    async def shutdown(self) -> None:
        """Stop the active run, wait for it to record itself."""
        run = self.active
        if run is not None:
            run.stop.set()
            try:
                await asyncio.wait_for(run.done.wait(), 30)
            except TimeoutError:
                if self._task is not None:
                    self._task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._task


def options_for(settings: Settings, mode: str, **chosen: Any) -> RunOptions:
    """A run's options: what the run chose over the settings' defaults; trash only on deletes."""
    trash = chosen.pop("trash", settings.trash)
    return RunOptions(
        mode=mode,
        grace=chosen.pop("grace", settings.grace),
        upload_max_age=settings.upload_max_age,
        registry_read_only=settings.registry_read_only,
        trash=trash if mode == DELETE else 0.0,
        **chosen,
    )


def manager_for(
    settings: Settings,
    storage: Storage,
    log: structlog.typing.FilteringBoundLogger,
    **options: Any,
) -> RunManager:
    """The run manager of the daemon or of a one-shot run: sources from ``settings``."""

    async def sources(name: str, log: structlog.typing.FilteringBoundLogger) -> ReferenceSource:
        return await open_source(name, settings, log)

    return RunManager(storage, sources, settings.state_dir, settings.history, log, **options)


def _hold(path: Path) -> IO[bytes]:
    """An exclusive lock on ``path`` for as long as the returned file stays open."""
    fh = open(path, "ab")  # noqa: SIM115 - held open on purpose, closed when the run ends
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fh


def _held(path: Path) -> bool:
    """True while a live process holds ``path``'s lock (a process that died holds none)."""
    try:
        with open(path, "rb") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False
    except OSError:
        return False


#: candidate lines that wait for the next second's write at most (~250 B each)
_CANDIDATE_LINES = 2048


def _append(path: Path, text: str) -> None:
    """Append whole lines or nothing: a full disk must not leave half a line behind."""
    with open(path, "ab") as fh:
        size = fh.seek(0, os.SEEK_END)
        try:
            fh.write(text.encode())
            fh.flush()
        except OSError:
            fh.truncate(size)
            raise
