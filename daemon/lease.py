"""A lease kept in the store itself, so two sidecars on one bucket never delete at once.

Where the store has conditional writes (create-if-absent, replace-if-unchanged) the lease is
taken and renewed with them. Elsewhere a writer writes, waits for racers' writes to land
(several times its own write-and-read time) and reads back: the last writer wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid

import structlog

from daemon import layout
from daemon.storage.base import Conflict, NotFound, Storage, StorageError

KEY = f"{layout.OWN}lease.json"
#: settle time as a multiple of the measured write-and-read time (fallback only)
SETTLE_FACTOR = 3.0


class LeaseHeld(Exception):
    """Another pruner holds the store's delete lease."""


class Lease:
    """Acquire, renew in the background, release. Expires by itself if its holder dies.

    The holder stops trusting the lease ``margin`` seconds before the ttl runs out after its
    last successful renewal: ``held()`` turns False and ``lost`` is set, whatever the store
    says (a holder that cannot write cannot tell whether another took over)."""

    def __init__(
        self,
        storage: Storage,
        run_id: str,
        ttl: float = 60.0,
        settle: float = 0.5,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ):
        self.storage = storage
        self.run_id = run_id
        self.ttl = ttl
        self.settle = settle  # the least settle time of the fallback
        # others see the lease expire by their own clocks: stop well before the ttl
        self.margin = ttl / 4
        self.holder = f"{socket.gethostname()}/{uuid.uuid4().hex[:8]}"
        #: who holds it, so that a successor on the same host can prove the holder dead
        self.process = process_identity()
        self.log = log or structlog.get_logger()
        self.lost = asyncio.Event()
        self.atomic = False  # conditional writes in use
        self.settled = 0.0  # the fallback's settle time, once measured
        self._version: str | None = None
        self._renewed = 0.0  # monotonic time a successful write was started
        self._renewer: asyncio.Task[None] | None = None

    # -- reading and writing ------------------------------------------------------------

    def _doc(self) -> bytes:
        doc = {
            "holder": self.holder,
            "run": self.run_id,
            "expires": time.time() + self.ttl,
            **self.process,
        }
        return json.dumps(doc).encode()

    @staticmethod
    def _parse(data: bytes) -> dict[str, object] | None:
        try:
            doc = json.loads(data)
        except ValueError:
            return None  # a torn lease is no lease: it can only come from a crash mid-write
        return doc if isinstance(doc, dict) else None

    async def _read(self) -> tuple[dict[str, object] | None, str | None]:
        """The lease document (None: none or torn) and its version (None: no object)."""
        try:
            if self.atomic:
                data, version = await self.storage.read_versioned(KEY, 4096)
            else:
                data, version = await self.storage.read(KEY, 4096), ""
        except NotFound:
            return None, None
        return self._parse(data), version

    def _check_free(self, current: dict[str, object] | None, dead_runs: frozenset[str]) -> None:
        if not current or current.get("holder") == self.holder:
            return
        expires = float(current.get("expires", 0) or 0)  # type: ignore[arg-type]
        if expires > time.time() and holder_dead(current, self.process):
            # a one-shot run killed on this very host: no need to wait for the expiry
            self.log.warning(
                "taking over the lease of a dead holder",
                holder=current.get("holder"),
                run=current.get("run"),
                pid=current.get("pid"),
            )
            return
        if expires > time.time() and current.get("run") not in dead_runs:
            raise LeaseHeld(
                f"another pruner ({current.get('holder')}, run {current.get('run')}) holds "
                f"this store's delete lease for {expires - time.time():.0f}s more"
            )

    # -- the lease ----------------------------------------------------------------------

    async def acquire(self, dead_runs: frozenset[str] = frozenset()) -> None:
        """Take the lease; ``dead_runs`` are runs known to have died holding it (take over)."""
        self.atomic = await self.storage.conditional_writes()
        current, version = await self._read()
        self._check_free(current, dead_runs)
        started = time.monotonic()
        if self.atomic:
            try:
                self._version = await self.storage.write_if(KEY, self._doc(), version)
            except Conflict:
                raise LeaseHeld(
                    "another pruner took this store's delete lease at the same moment"
                ) from None
        else:
            await self.storage.write(KEY, self._doc())
            await self.storage.read(KEY, 4096)
            # racers' writes take as long as ours: wait several times our own write and
            # read, so that every racing write has landed before the last read decides
            self.settled = max(self.settle, SETTLE_FACTOR * (time.monotonic() - started))
            await asyncio.sleep(self.settled)
            current, _version = await self._read()
            if not current or current.get("holder") != self.holder:
                raise LeaseHeld("another pruner took this store's delete lease at the same moment")
        self._renewed = started
        self.log.info(
            "lease acquired", conditional_writes=self.atomic, settle=round(self.settled, 3)
        )
        self._renewer = asyncio.create_task(self._renew())

    def held(self) -> bool:
        """Still ours: not lost, and renewed within the ttl (less the margin)."""
        if not self.lost.is_set() and time.monotonic() - self._renewed > self.ttl - self.margin:
            self.log.error("lease expired: renewals failed for too long", ttl=self.ttl)
            self.lost.set()
        return not self.lost.is_set()

    async def _renew(self) -> None:
        pause = self.ttl / 3
        while True:
            await asyncio.sleep(pause)
            if not self.held():
                return
            started = time.monotonic()
            try:
                if self.atomic:
                    self._version = await self.storage.write_if(KEY, self._doc(), self._version)
                else:
                    current, _version = await self._read()
                    if current and current.get("holder") != self.holder:
                        raise Conflict(f"now held by {current.get('holder')}")
                    await self.storage.write(KEY, self._doc())
            except Conflict as exc:
                self.log.error("lease taken over by another pruner", reason=str(exc))
                self.lost.set()
                return
            except StorageError as exc:
                # try again soon; held() gives up once the ttl (less the margin) has passed
                self.log.warning("lease renewal failed", error=str(exc))
                pause = min(self.ttl / 3, max(self.ttl / 20, 0.05))
                continue
            self._renewed = started
            pause = self.ttl / 3

    async def release(self) -> None:
        if self._renewer is None:
            return  # never acquired
        self._renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._renewer
        if not self.held():
            return  # perhaps another's by now: theirs to keep
        with contextlib.suppress(StorageError):
            current, _version = await self._read()
            if current and current.get("holder") == self.holder:
                await self.storage.delete_keys([KEY])


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" if none): a pid used again
    by a later process has another."""
    stat = _read(f"/proc/{pid}/stat")
    # the command name (field 2) may hold spaces and parentheses: count from its end
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def process_identity() -> dict[str, object]:
    """Host, boot, PID namespace, pid and its start time of this process (Linux)."""
    pid = os.getpid()
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return {
        "host": socket.gethostname(),
        "boot_id": _read("/proc/sys/kernel/random/boot_id"),
        "pid_namespace": namespace,
        "pid": pid,
        "pid_start": _start_time(pid),
    }


def holder_dead(lease: dict[str, object], me: dict[str, object]) -> bool:
    """True only where the lease's holder is provably gone: it ran on this host, this boot,
    in this PID namespace, and its pid is now free or another process's. Anything unknown
    (another pod, another namespace, an older lease without these fields): False."""
    for field in ("host", "boot_id", "pid_namespace"):
        if not me.get(field) or lease.get(field) != me.get(field):
            return False
    pid, started = lease.get("pid"), lease.get("pid_start")
    if not isinstance(pid, int) or pid <= 0 or not isinstance(started, str) or not started:
        return False
    # "" once the pid is free; another start time once a later process took the pid (a
    # zombie not yet reaped keeps its own: alive until its parent has seen it die)
    return _start_time(pid) != started
