"""The async storage interface every driver implements; keys are relative to the v2 root."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from collections.abc import Set as AbstractSet
from contextvars import ContextVar
from typing import TypeVar

import structlog

from daemon import layout
from daemon.storage.model import (
    BlobEntry,
    Conflict,
    DeleteFailure,
    Entry,
    NotFound,
    StorageError,
    TooLarge,
)
from daemon.storage.reading import as_is, parse_each
from daemon.usage import size_record
from daemon.workers import in_parallel

__all__ = [
    "BlobEntry",
    "Conflict",
    "DeleteFailure",
    "Entry",
    "NotFound",
    "Storage",
    "StorageError",
    "TooLarge",
]

P = TypeVar("P")
R = TypeVar("R")
#: the running run's logger (bound to its run_id), set by the engine for the run's tasks:
#: drivers shared by successive runs log their retries with the run that caused them
RUN_LOG: ContextVar[structlog.typing.FilteringBoundLogger | None] = ContextVar(
    "RUN_LOG", default=None
)
#: contents parsed between two turns of the event loop (status requests wait for a turn)
PARSE_SLICE = 8


def split_sized(
    entries: Sequence[BlobEntry],
    members: AbstractSet[bytes],
    outside: list[BlobEntry],
    sized: bytearray,
) -> None:
    """Entries outside ``members`` go to ``outside``; the size of each inside, when known,
    to ``sized`` as a ``size_record``."""
    for entry in entries:
        raw = bytes.fromhex(entry.hex)
        if raw not in members:
            outside.append(entry)
        elif entry.size is not None:
            sized += size_record(raw, entry.size)


class Storage(ABC):
    """One registry store. All keys are relative to ``<root>/docker/registry/v2/``."""

    #: human description for logs and errors, e.g. ``filesystem:/var/lib/registry``
    description: str = ""
    #: how many requests/threads the engine may keep in flight against this driver
    concurrency: int = 8
    #: a blob shard's listing names only blobs that have data (object stores list the
    #: ``data`` keys themselves); verify after a delete then trusts the sweep's listing
    listing_proves_data: bool = False

    @abstractmethod
    async def probe(self) -> None:
        """Raise StorageError with a clear message unless the root is a reachable registry store."""

    def warm_up(self) -> None:  # noqa: B027 - optional hook
        """A run is starting: a driver may start its helpers now, in the background."""

    def cool_down(self) -> None:  # noqa: B027 - optional hook
        """The run that called ``warm_up`` has ended: its helpers may stop once idle."""

    def expect_tag_reads(self) -> None:  # noqa: B027 - optional hook
        """The next ``scan_repositories`` is followed by reads of every tag's ``current/link``
        (untagged, retention and verify runs): a driver may keep what its listing proves of
        them until they are read (object stores: their MD5s, daemon/storage/objectstore.py)."""

    @abstractmethod
    async def list_blob_shard(self, shard: str) -> list[BlobEntry]:
        """Every blob under ``blobs/sha256/<shard>/`` (size/mtime where the listing has them)."""

    async def blobs_outside(
        self, shard: str, members: AbstractSet[bytes]
    ) -> tuple[int, list[BlobEntry]]:
        """How many blobs ``shard`` holds, and those whose raw digest is not in ``members``,
        with size and mtime (None where the blob has no data)."""
        entries = await self.list_blob_shard(shard)
        outside = await self._with_data([e for e in entries if bytes.fromhex(e.hex) not in members])
        return len(entries), outside

    async def _with_data(self, entries: list[BlobEntry]) -> list[BlobEntry]:
        """``entries``, each with its data's size and mtime where the listing had none."""
        unknown = [e.hex for e in entries if e.size is None or e.mtime is None]
        if not unknown:
            return entries
        found = await self.stat_many([layout.blob_data(h) for h in unknown])
        stats = dict(zip(unknown, found, strict=True))
        return [
            e if e.hex not in stats else BlobEntry.with_data(e.hex, stats[e.hex], e.linked)
            for e in entries
        ]

    async def blob_sizes(self, shard: str, wanted: AbstractSet[bytes]) -> dict[bytes, int]:
        """The data size of each blob of ``wanted`` (raw digests in ``shard``) that has data;
        one missing, or without data, is left out. Verify's existence check."""
        found: dict[bytes, int] = {}
        unknown: list[str] = []
        for entry in await self.list_blob_shard(shard):
            raw = bytes.fromhex(entry.hex)
            if raw in wanted:
                if entry.size is None:
                    unknown.append(entry.hex)
                else:
                    found[raw] = entry.size
        for start in range(0, len(unknown), 256):
            part = unknown[start : start + 256]
            stats = await self.stat_many([layout.blob_data(h) for h in part])
            for hexdigest, stat in zip(part, stats, strict=True):
                if stat is not None and stat.size is not None:
                    found[bytes.fromhex(hexdigest)] = stat.size
        return found

    async def blob_mismatches(self, shard: str, wants: bytes) -> list[tuple[bytes, int | None]]:
        """Verify's blob check of one shard: of ``daemon.verifying.SIZE_WANT`` records, each
        blob with no data (None) or whose data has a size some record does not want (it)."""
        from daemon.verifying import SIZE_WANT, size_mismatches

        wanted = {raw for raw, _w in SIZE_WANT.iter_unpack(wants)}
        return size_mismatches(wants, (await self.blob_sizes(shard, wanted)).get)

    async def blobs_outside_sized(
        self, shard: str, members: AbstractSet[bytes]
    ) -> tuple[int, list[BlobEntry], bytes]:
        """``blobs_outside``, and the sizes of the blobs inside ``members`` as
        ``daemon.usage.SIZED`` records (for per-repository usage); no record without data."""
        entries = await self._with_data(await self.list_blob_shard(shard))
        outside: list[BlobEntry] = []
        sized = bytearray()
        split_sized(entries, members, outside, sized)
        return len(entries), outside, bytes(sized)

    @abstractmethod
    async def stat(self, key: str) -> Entry | None:
        """Size and mtime of one key, None when it does not exist."""

    @abstractmethod
    def walk(self, prefix: str) -> AsyncIterator[list[Entry]]:
        """Every file below ``prefix`` (ends with '/'), recursively, in batches, any order."""

    @abstractmethod
    async def list_dir(self, prefix: str) -> tuple[list[str], list[str]]:
        """One level below ``prefix``: (file names, directory names)."""

    @abstractmethod
    async def read(self, key: str, limit: int) -> bytes:
        """Whole content of ``key``; NotFound if missing, TooLarge if over ``limit`` bytes."""

    @abstractmethod
    async def write(self, key: str, data: bytes) -> None:
        """Replace ``key`` with ``data`` atomically (readers see old or new, never a mix)."""

    @abstractmethod
    async def delete_blobs(self, hexes: Sequence[str]) -> list[DeleteFailure]:
        """Delete whole blobs (data and their directory); a missing blob is not a failure.

        A failure names the blob by its hex digest, whatever the driver deleted to remove it."""

    @abstractmethod
    async def delete_keys(self, keys: Sequence[str]) -> list[DeleteFailure]:
        """Delete single files/objects; a missing key is not a failure."""

    @abstractmethod
    async def delete_tree(self, prefix: str) -> list[DeleteFailure]:
        """Delete everything below ``prefix`` (ends with '/'); a failure names ``prefix``."""

    async def delete_trees(self, prefixes: Sequence[str]) -> list[DeleteFailure]:
        """``delete_tree`` of each prefix; drivers batch it. One failure per prefix given."""
        failures: list[DeleteFailure] = []
        for prefix in prefixes:
            failures += await self.delete_tree(prefix)
        return failures

    async def read_many(self, keys: Sequence[str], limit: int) -> list[bytes | None]:
        """``read`` of each key (None where missing); drivers batch it. Keep ``keys`` short."""

        async def one(key: str) -> bytes | None:
            try:
                return await self.read(key, limit)
            except NotFound:
                return None

        # ``concurrency`` reads at a time, not a task per key: the store serves that many
        # anyway, and every verify worker's chunk waiting as tasks held ~15 MB at 1M blobs
        return await in_parallel(keys, one, self.concurrency)

    async def read_parsed(
        self, keys: Sequence[str], limit: int, parse: Callable[[bytes], P]
    ) -> list[P | ValueError | None]:
        """``read_many``, each content through ``parse``: None where missing, the ValueError
        where ``parse`` raised one. ``parse`` is module-level: a driver may run it elsewhere."""
        return await self.read_folded(keys, limit, parse, as_is)

    async def read_folded(
        self,
        keys: Sequence[str],
        limit: int,
        parse: Callable[[bytes], P],
        fold: Callable[[list[P | ValueError | None]], R],
    ) -> R:
        """``fold`` of ``read_parsed``'s results, where the parse ran: a driver that parses in
        another process overrides this alone and hands back only what ``fold`` makes of a
        chunk (module-level too)."""
        datas = await self.read_many(keys, limit)
        out: list[P | ValueError | None] = []
        for start in range(0, len(datas), PARSE_SLICE):
            out += parse_each(datas[start : start + PARSE_SLICE], parse)
            await asyncio.sleep(0)
        return fold(out)

    async def stat_many(self, keys: Sequence[str]) -> list[Entry | None]:
        """``stat`` of each key; drivers batch it. Keep ``keys`` short."""
        return await in_parallel(keys, self.stat, self.concurrency)

    async def scan_repositories(self, layers: bool = True) -> AsyncIterator[list[str]]:
        """Keys under repositories/ as the layout names them, in batches.

        A driver may name a link without confirming it exists (readers of links handle
        NotFound), so that a filesystem need not open a directory per link. With
        ``layers`` False a driver may name a repository's ``_layers/`` directory (that
        key, ending in '/') instead of listing the links in it: most of the keys.
        """
        async for batch in self.walk("repositories/"):
            yield [entry.key for entry in batch]

    def clock(self) -> float | None:
        """The store's time now (seconds since the epoch), as its last ``probe`` measured it;
        None where file times come from this host's clock."""
        return None

    async def conditional_writes(self) -> bool:
        """Whether ``write_if`` is atomic on this store (a driver may ask the store once)."""
        return False

    async def read_versioned(self, key: str, limit: int) -> tuple[bytes, str]:
        """Content of ``key`` and a version token for ``write_if``; NotFound if missing."""
        raise StorageError(f"{type(self).__name__} has no conditional writes")

    async def write_if(self, key: str, data: bytes, version: str | None) -> str:
        """Create ``key`` if ``version`` is None and it does not exist, else replace it if its
        version is still ``version``, atomically; the new version. Conflict otherwise."""
        raise StorageError(f"{type(self).__name__} has no conditional writes")

    async def move(self, src: str, dst: str) -> bool:
        """Move one file/object; False when ``src`` does not exist."""
        raise StorageError(f"{type(self).__name__} cannot move {src}")

    async def move_keys(
        self, moves: Sequence[tuple[str, str, int | None]]
    ) -> tuple[list[str], list[DeleteFailure]]:
        """Move each ``(src, dst, size or None)``: the sources moved (a missing source is
        neither moved nor a failure) and the failures, named by source. Drivers batch it."""
        moved: list[str] = []
        failures: list[DeleteFailure] = []
        for src, dst, _size in moves:
            try:
                if await self.move(src, dst):
                    moved.append(src)
            except StorageError as exc:
                failures.append(DeleteFailure(src, str(exc)))
        return moved, failures

    async def remove_empty_dirs(self, prefixes: Sequence[str]) -> None:  # noqa: B027
        """Remove these directories where they are empty; object stores have none."""

    def take_notes(self) -> list[str]:
        """What the last scan read in an unusual way (a driver that follows symbolic links
        says which), once; a run reports them."""
        return []

    def location(self, key: str) -> str:
        """Where ``key`` lives, for people: a file path or an s3:// URL."""
        return key

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and threads."""
