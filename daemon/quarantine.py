"""Online deletes park blobs aside first, so that a push that raced the run can be made whole.

A parked blob is missing for the registry: a push that checks for it uploads it again or
fails. After a settle time the reference source says which parked blobs an image created
meanwhile needs; those go back, the rest are deleted. A run that dies with blobs parked
leaves them here, and the next delete run puts them back before it decides anything.
"""

from __future__ import annotations

from collections.abc import Sequence

from daemon import layout
from daemon.storage.base import DeleteFailure, Storage, StorageError

PREFIX = "_registry-pruned/quarantine/"


class Quarantine:
    def __init__(self, storage: Storage, run_id: str) -> None:
        self.storage = storage
        self.run_id = run_id

    def key(self, hexdigest: str) -> str:
        return f"{PREFIX}{self.run_id}/{hexdigest}"

    async def park(self, hexes: Sequence[str]) -> list[str]:
        """Move each blob's data aside; the blobs that were there to move. When a move fails,
        those already parked go back before the error is raised."""
        parked: list[str] = []
        try:
            for hexdigest in hexes:
                if await self.storage.move(layout.blob_data(hexdigest), self.key(hexdigest)):
                    parked.append(hexdigest)
        except StorageError:
            # if this fails too, the next delete run's recover() puts them back
            await self.release(parked)
            raise
        return parked

    async def release(self, hexes: Sequence[str]) -> None:
        """Put parked blobs back (a blob uploaded again meanwhile has the same bytes)."""
        for hexdigest in hexes:
            await self._put_back(self.key(hexdigest), hexdigest)

    async def purge(self, hexes: Sequence[str]) -> list[DeleteFailure]:
        """Delete parked copies for good; an original uploaded again meanwhile stays."""
        failures = await self.storage.delete_keys([self.key(h) for h in hexes])
        failed = {f.key for f in failures}
        gone = [h for h in hexes if self.key(h) not in failed]
        await self.storage.remove_empty_dirs([layout.blob_dir(h) for h in gone])
        return [DeleteFailure(f.key.rsplit("/", 1)[-1], f.reason) for f in failures]

    async def recover(self) -> int:
        """Put back what runs that died left parked; how many blobs."""
        count = 0
        async for batch in self.storage.walk(PREFIX):
            for entry in batch:
                hexdigest = entry.key.rsplit("/", 1)[-1]
                if layout.is_hex(hexdigest):
                    await self._put_back(entry.key, hexdigest)
                    count += 1
        return count

    async def _put_back(self, key: str, hexdigest: str) -> None:
        if await self.storage.stat(layout.blob_data(hexdigest)) is None:
            await self.storage.move(key, layout.blob_data(hexdigest))
        else:
            await self.storage.delete_keys([key])
