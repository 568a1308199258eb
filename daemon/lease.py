"""A lease kept in the store itself, so two sidecars on one bucket never delete at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid

from daemon.storage.base import NotFound, Storage, StorageError

KEY = "_registry-pruned/lease.json"


class LeaseHeld(Exception):
    """Another pruner holds the store's delete lease."""


class Lease:
    """Acquire, renew in the background, release. Expires by itself if its holder dies."""

    def __init__(self, storage: Storage, run_id: str, ttl: float = 60.0, settle: float = 0.5):
        self.storage = storage
        self.run_id = run_id
        self.ttl = ttl
        self.settle = settle
        self.holder = f"{socket.gethostname()}/{uuid.uuid4().hex[:8]}"
        self._renewer: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()

    async def _read(self) -> dict[str, object] | None:
        try:
            data = await self.storage.read(KEY, 4096)
        except NotFound:
            return None
        try:
            doc = json.loads(data)
        except ValueError:
            return None  # a torn lease is no lease: it can only come from a crash mid-write
        return doc if isinstance(doc, dict) else None

    async def _write(self) -> None:
        doc = {"holder": self.holder, "run": self.run_id, "expires": time.time() + self.ttl}
        await self.storage.write(KEY, json.dumps(doc).encode())

    async def acquire(self, dead_runs: frozenset[str] = frozenset()) -> None:
        """Take the lease; ``dead_runs`` are runs known to have died holding it (take over)."""
        current = await self._read()
        if current and current.get("holder") != self.holder:
            expires = float(current.get("expires", 0) or 0)
            if expires > time.time() and current.get("run") not in dead_runs:
                raise LeaseHeld(
                    f"another pruner ({current.get('holder')}, run {current.get('run')}) holds "
                    f"this store's delete lease for {expires - time.time():.0f}s more"
                )
        await self._write()
        # no compare-and-swap on every store: write, let racers write too, then the last
        # writer wins and everyone else backs off
        await asyncio.sleep(self.settle)
        current = await self._read()
        if not current or current.get("holder") != self.holder:
            raise LeaseHeld("another pruner took this store's delete lease at the same moment")
        self._renewer = asyncio.create_task(self._renew())

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                current = await self._read()
                if current and current.get("holder") != self.holder:
                    self.lost.set()
                    return
                await self._write()
            except StorageError:
                continue  # the next renewal tries again; the ttl leaves two more chances

    async def release(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        with contextlib.suppress(StorageError):
            current = await self._read()
            if current and current.get("holder") == self.holder:
                await self.storage.delete_keys([KEY])
