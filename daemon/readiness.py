"""The storage probe behind /readyz, its answer reused for a few seconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from daemon.storage.base import Storage, StorageError


class Readiness:
    """One probe at a time, its answer kept ``ttl`` seconds: probes cannot load the store."""

    def __init__(
        self,
        storage: Storage,
        ttl: float = 5.0,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage = storage
        self.ttl = ttl
        self.timeout = timeout
        self.clock = clock
        self.probes = 0  # how many times the store was asked (for /metrics and tests)
        self._lock = asyncio.Lock()
        self._checked_at: float | None = None
        self._error: str | None = None

    def _fresh(self) -> bool:
        return self._checked_at is not None and self.clock() - self._checked_at < self.ttl

    async def error(self) -> str | None:
        """None when the store is reachable, else why not (for trusted callers only)."""
        if self._fresh():
            return self._error
        async with self._lock:
            # callers that waited here reuse the answer of the one that probed
            if not self._fresh():
                self.probes += 1
                try:
                    await asyncio.wait_for(self.storage.probe(), self.timeout)
                    error = None
                except StorageError as exc:
                    error = f"storage not ready: {exc}"
                except TimeoutError:
                    error = f"storage not ready: no answer within {self.timeout:g}s"
                self._checked_at, self._error = self.clock(), error
        return self._error
