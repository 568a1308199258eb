"""Packed, sorted sets of 32-byte digests and of short names: a few bytes an item where a
Python ``set`` of ``bytes`` or ``str`` takes ~110. No asyncio: reader processes import it.

A buffer holds fixed-width records, each once, in byte order (hex order is byte order, so a
sorted listing of a shard meets them in the same order). Lookups bisect; a caller asking in
ascending order (a merge against a sorted listing) moves a cursor forward instead.
"""

from __future__ import annotations

import bisect
import os
import re
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator, MutableSet, Sequence
from collections.abc import Set as AbstractSet
from typing import Generic, Protocol, TypeVar, overload

WIDTH = 32
_RECORDS = re.compile(rb".{32}", re.DOTALL)  # 32-byte records, split in C
_STEPS = 8  # records a forward lookup walks before it bisects


def records(data: bytes, width: int = WIDTH) -> list[bytes]:
    """The ``width``-byte records concatenated in ``data``."""
    if width == WIDTH:
        return _RECORDS.findall(data)
    return re.findall(b".{%d}" % width, data, re.DOTALL)  # the re module caches the pattern


def sorted_unique(*parts: bytes) -> bytes:
    """The 32-byte records of ``parts``, each once, in byte order, concatenated."""
    found: list[bytes] = []
    for part in parts:
        if len(part) % WIDTH:
            raise ValueError("a packed digest buffer holds 32-byte digests")
        found += _RECORDS.findall(part)
    # a part already sorted (a merged run) is one run to the sort, which merges the rest
    # into it in linear time: a set's order made each merge n log n (issue 19's time ratio)
    return b"".join(dict.fromkeys(sorted(found)))


class _Records(Sequence[bytes]):
    """A buffer's records as a sequence, for ``bisect`` (no copy of the buffer)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data) // WIDTH

    @overload
    def __getitem__(self, i: int) -> bytes: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[bytes]: ...
    def __getitem__(self, i: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(i, slice):
            raise TypeError("no slices")
        return self.data[i * WIDTH : (i + 1) * WIDTH]


def find_sorted(data: bytes, value: bytes, lo: int = 0) -> tuple[bool, int]:
    """Whether ``value`` is a record of the sorted buffer ``data``, and where it is (or would
    be), searching from record ``lo`` on."""
    at = bisect.bisect_left(_Records(data), value, lo)
    return data[at * WIDTH : (at + 1) * WIDTH] == value, at


def in_unsorted(data: bytes | bytearray, value: bytes) -> bool:
    """Whether ``value`` is one of the 32-byte records of the unsorted buffer ``data``."""
    at = data.find(value)
    while at >= 0:
        if at % WIDTH == 0:
            return True
        at = data.find(value, at + 1)
    return False


class OnceSet:
    """32-byte digests, each answered once by ``take``: a sorted buffer and a byte a digest
    for "taken" (~33 B a digest where a ``set[bytes]`` that forgets what it answers took
    ~120). Added to first, then taken from; a digest added later is merged in on the next
    ``take``."""

    __slots__ = ("_left", "_run", "_tail", "_taken")

    def __init__(self) -> None:
        self._run = b""
        self._taken = bytearray()  # 1 where the digest at that index was taken
        self._tail = bytearray()
        self._left = 0

    def add(self, raw: bytes) -> None:
        if len(raw) != WIDTH:
            raise ValueError("a OnceSet holds 32-byte digests")
        self._tail += raw

    def _settle(self) -> None:
        if not self._tail:
            return
        old = records(self._run)
        taken = {raw for raw, t in zip(old, self._taken, strict=True) if t}
        self._run = sorted_unique(self._run, bytes(self._tail))
        self._tail = bytearray()
        count = len(self._run) // WIDTH
        self._taken = bytearray(count)
        if taken:  # digests added after a take: those taken stay taken
            self._taken = bytearray(raw in taken for raw in records(self._run))
        self._left = self._taken.count(0)

    def take(self, raw: bytes) -> bool:
        """Whether ``raw`` was added and not yet taken; it is taken from now on."""
        self._settle()
        found, at = find_sorted(self._run, raw)
        if not found or self._taken[at]:
            return False
        self._taken[at] = 1
        self._left -= 1
        return True

    def __len__(self) -> int:
        """How many digests are left to take."""
        self._settle()
        return self._left

    def __bool__(self) -> bool:
        return bool(self._tail) or self._left > 0


class PackedShard(AbstractSet[bytes]):
    """An immutable set of 32-byte digests over one sorted, deduplicated buffer.

    Ascending lookups (a merge join with a sorted listing) cost a few comparisons each; any
    other order bisects. Pickles as its buffer (a sweep sends it to a reader process).
    """

    __slots__ = ("_at", "data")

    def __init__(self, data: bytes | bytearray = b"") -> None:
        # a bytearray only where no one else holds it (it is never changed): records handed
        # out are bytes all the same (findall and ``starting_with`` make them)
        if len(data) % WIDTH:
            raise ValueError("a packed digest buffer holds 32-byte digests")
        self.data = data
        #: (last value asked, its position): one tuple, replaced whole, so that a reader of
        #: the pair never sees one lookup's value with another's position
        self._at: tuple[bytes, int] = (b"", 0)

    def __reduce__(self) -> tuple[type[PackedShard], tuple[bytes]]:
        return PackedShard, (bytes(self.data),)

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, bytes) or len(value) != WIDTH:
            return False
        data = self.data
        last, lo = self._at
        if value < last:
            lo = 0  # not ascending: bisect the whole buffer
        else:
            # a merge: the answer is at or after the last one, usually a few records on
            end = len(data)
            for _ in range(_STEPS):
                record = data[lo * WIDTH : (lo + 1) * WIDTH]
                if lo * WIDTH >= end or record >= value:
                    self._at = (value, lo)
                    return record == value
                lo += 1
        found, at = find_sorted(data, value, lo)
        self._at = (value, at)
        return found

    def starting_with(self, prefix: bytes) -> list[bytes]:
        """The digests that begin with ``prefix``."""
        found: list[bytes] = []
        at = bisect.bisect_left(_Records(self.data), prefix)
        while True:
            record = self.data[at * WIDTH : (at + 1) * WIDTH]
            if not record.startswith(prefix) or not record:
                return found
            found.append(bytes(record))
            at += 1

    def __len__(self) -> int:
        return len(self.data) // WIDTH

    def __iter__(self) -> Iterator[bytes]:
        # in blocks: a list of every record at once (100,000 doomed digests at 1M: 6.5 MB of
        # bytes objects, in the delete phase's layer-link pass) was a delete run's peak
        data, step = self.data, WIDTH * 4096
        for start in range(0, len(data), step):
            yield from _RECORDS.findall(data, start, start + step)

    def __repr__(self) -> str:
        return f"PackedShard({len(self)} digests)"


class HexSet(MutableSet[str]):
    """A set of sha256 hex strings held as sorted raw digests (32 bytes each, plus a small
    unsorted tail); iterates in hex order. Set operators give plain sets."""

    __slots__ = ("_run", "_tail")

    def __init__(self, items: Iterable[str] = ()) -> None:
        self._run = b""
        self._tail = bytearray()
        for item in items:
            self.add(item)

    @classmethod
    def _from_iterable(cls, it: Iterable[str]) -> set[str]:
        return set(it)

    def add_raw(self, raw: bytes) -> None:
        """Add one 32-byte digest."""
        if len(raw) != WIDTH:
            raise ValueError("a HexSet holds 32-byte digests")
        self._tail += raw
        if len(self._tail) > max(16 * WIDTH, len(self._run) // 8):
            self._settle()

    def add(self, value: str) -> None:
        self.add_raw(bytes.fromhex(value))

    def update(self, values: Iterable[str]) -> None:
        for value in values:
            self.add(value)

    def _settle(self) -> bytes:
        if self._tail:
            self._run = sorted_unique(self._run, self._tail)
            self._tail = bytearray()
        return self._run

    def contains_raw(self, raw: bytes) -> bool:
        return in_unsorted(self._tail, raw) or find_sorted(self._run, raw)[0]

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, str) or len(value) != 2 * WIDTH:
            return False
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            return False
        return self.contains_raw(raw)

    def discard(self, value: str) -> None:
        if value not in self:
            return
        raw = bytes.fromhex(value)
        run = self._settle()
        _found, at = find_sorted(run, raw)
        self._run = run[: at * WIDTH] + run[(at + 1) * WIDTH :]

    def __len__(self) -> int:
        return len(self._settle()) // WIDTH

    def __iter__(self) -> Iterator[str]:
        for raw in _RECORDS.findall(self._settle()):
            yield raw.hex()

    def raws(self) -> list[bytes]:
        """The raw digests, in byte order."""
        return _RECORDS.findall(self._settle())

    def __repr__(self) -> str:
        return f"HexSet({len(self)} digests)"


class NameSet(MutableSet[str]):
    """A set of short names (tags: path components, so never containing '/') held as one
    sorted string, each name after a '/', and a short list; iterates in sorted order."""

    __slots__ = ("_run", "_tail")
    _SEP = "/"

    def __init__(self, items: Iterable[str] = ()) -> None:
        self._run = ""
        self._tail: list[str] = []
        for item in items:
            self.add(item)

    @classmethod
    def _from_iterable(cls, it: Iterable[str]) -> set[str]:
        return set(it)

    def add(self, value: str) -> None:
        if self._SEP in value:
            raise ValueError(f"not a name: {value!r}")
        self._tail.append(value)
        if len(self._tail) > 16:
            self._settle()

    def update(self, values: Iterable[str]) -> None:
        for value in values:
            self.add(value)

    def _names(self) -> list[str]:
        return self._run.split(self._SEP)[1:]

    def _settle(self) -> str:
        if self._tail:
            self._run = "".join(self._SEP + n for n in sorted({*self._names(), *self._tail}))
            self._tail = []
        return self._run

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, str) or self._SEP in value:
            return False
        return value in self._tail or value in self._names()

    def discard(self, value: str) -> None:
        if value in self:
            self._settle()
            self._run = "".join(self._SEP + n for n in self._names() if n != value)

    def __len__(self) -> int:
        return self._settle().count(self._SEP)

    def __iter__(self) -> Iterator[str]:
        self._settle()
        return iter(self._names())

    def __repr__(self) -> str:
        return f"NameSet({len(self)} names)"


class Sized(Protocol):
    digest: bytes
    size: int


S = TypeVar("S", bound=Sized)


class PackedCandidates(Generic[S]):
    """A delete run's candidates as 40-byte records (digest, size) by shard, where a candidate
    object with its path took ~300 bytes: in memory, or in the file of ``records`` (the state
    dir's: 10.6 MB at 265k candidates set a 1M S3 delete's peak, issue 19). Each comes back
    made by ``make``, in shard order."""

    __slots__ = ("_counts", "_last", "_make", "_store")
    RECORD = WIDTH + 8  # digest, size

    def __init__(
        self, make: Callable[[bytes, int], S], records: ShardRecords | None = None
    ) -> None:
        if records is not None and records.width != self.RECORD:
            raise ValueError(f"candidates are records of {self.RECORD} bytes")
        self._store = records if records is not None else ShardRecords(self.RECORD)
        self._counts = array("q", [0]) * 256
        # the shard last read back: a delete's batches slice it ~1,000 records at a time
        self._last: tuple[int, bytes] | None = None
        self._make = make

    def append(self, item: S) -> None:
        if len(item.digest) != WIDTH:
            raise ValueError("a candidate is named by a 32-byte digest")
        self._store.add(item.digest + item.size.to_bytes(8, "little"))
        self._counts[item.digest[0]] += 1
        self._last = None

    def _shard(self, shard: int) -> bytes:
        if self._last is None or self._last[0] != shard:
            self._last = (shard, self._store.read(shard))
        return self._last[1]

    def _records(self, start: int, stop: int) -> Iterator[bytes]:
        """Records ``start`` to ``stop`` (indexes across the shards, in shard order)."""
        r = self.RECORD
        first = 0
        for shard, count in enumerate(self._counts):
            lo, hi = max(start - first, 0), min(stop - first, count)
            if lo < hi:
                data = self._shard(shard)
                for j in range(lo, hi):
                    yield data[j * r : (j + 1) * r]
            first += count
            if first >= stop:
                return

    def _made(self, record: bytes) -> S:
        return self._make(record[:WIDTH], int.from_bytes(record[WIDTH:], "little"))

    def __len__(self) -> int:
        return sum(self._counts)

    def __bool__(self) -> bool:
        return any(self._counts)

    @overload
    def __getitem__(self, i: int) -> S: ...
    @overload
    def __getitem__(self, i: slice) -> list[S]: ...
    def __getitem__(self, i: int | slice) -> S | list[S]:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("candidates are sliced in steps of one")
            return [self._made(rec) for rec in self._records(start, stop)]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        return self[i % n : i % n + 1][0]

    def __iter__(self) -> Iterator[S]:
        for rec in self._records(0, len(self)):
            yield self._made(rec)

    def _shard_digests(self, shard: int, *, take: bool) -> bytes:
        """One shard's candidates' digests, sorted and each once; ``take`` forgets the
        shard's candidates."""
        if not self._counts[shard]:
            return b""
        if take:
            data = self._store.take(shard)
            self._counts[shard] = 0
            self._last = None
        else:
            data = self._shard(shard)
        r = self.RECORD
        return sorted_unique(b"".join(data[j : j + WIDTH] for j in range(0, len(data), r)))

    def digests(self, *, take: bool = False) -> PackedShard:
        """Every candidate's digest, as a packed set: sorted a shard at a time, so the only
        transient is one shard's records. ``take`` forgets each shard's candidates once
        its digests are out."""
        out = bytearray()
        for shard in range(256):
            out += self._shard_digests(shard, take=take)
        # over the bytearray itself, which no one else holds: a copy (3.2 MB at 1M) beside it
        # was a delete phase's peak (issue 19)
        return PackedShard(out)

    def digests_into(self, into: SpilledDigests) -> None:
        """Every candidate's digest, a sorted shard at a time, into ``into``; each shard's
        candidates are forgotten as their digests go (the verification after a delete)."""
        for shard in range(256):
            data = self._shard_digests(shard, take=True)
            if data:
                into.add_shard(shard, data)

    def close(self) -> None:
        """Forget every candidate; a file goes with them."""
        self._counts = array("q", [0]) * 256
        self._last = None
        self._store.close()


#: ``BlobSizes`` values that are no size
MISSING = -1  # no data found
UNSIZED = -2  # has data, size not known (a listing proved it)


class BlobSizes:
    """Digests, each with a size or MISSING/UNSIZED: per shard a sorted buffer of 32-byte
    records and an aligned ``array('q')`` (40 B a digest where a ``dict`` takes ~200)."""

    __slots__ = ("_data", "_sizes", "_tails")

    def __init__(self) -> None:
        self._tails: list[bytearray] | None = [bytearray() for _ in range(256)]
        self._data: list[bytes] = [b""] * 256
        self._sizes: list[array[int]] = [array("q") for _ in range(256)]

    def add_packed(self, packed: bytes) -> None:
        """Add the 32-byte records of ``packed`` (before ``seal``); repeats are kept once."""
        if self._tails is None:
            raise RuntimeError("sealed")
        if len(packed) % WIDTH:
            raise ValueError("a packed digest buffer holds 32-byte digests")
        tails = self._tails
        for start in range(0, len(packed), WIDTH):
            tails[packed[start]] += packed[start : start + WIDTH]

    def seal(self) -> None:
        """Sort each shard once; every digest is MISSING until ``set``."""
        if self._tails is None:
            return
        for shard, tail in enumerate(self._tails):
            data = sorted_unique(bytes(tail)) if tail else b""
            self._tails[shard] = bytearray()  # free as we go: one shard's set at a time
            self._data[shard] = data
            self._sizes[shard] = array("q", [MISSING]) * (len(data) // WIDTH)
        self._tails = None

    def shard(self, shard: int) -> bytes:
        """The sorted records of one shard."""
        return self._data[shard]

    def _at(self, raw: bytes) -> int:
        found, at = find_sorted(self._data[raw[0]], raw)
        return at if found else -1

    def set(self, raw: bytes, size: int) -> None:
        at = self._at(raw)
        if at < 0:
            raise KeyError(raw)
        self._sizes[raw[0]][at] = size

    def get(self, raw: bytes) -> int:
        """The size, MISSING or UNSIZED; MISSING for a digest never added."""
        at = self._at(raw)
        return MISSING if at < 0 else self._sizes[raw[0]][at]

    def __contains__(self, raw: object) -> bool:
        """Whether the digest has data."""
        return isinstance(raw, bytes) and len(raw) == WIDTH and self.get(raw) != MISSING

    def __len__(self) -> int:
        return sum(len(d) for d in self._data) // WIDTH

    def items(self) -> Iterator[tuple[bytes, int]]:
        for data, sizes in zip(self._data, self._sizes, strict=True):
            for index, size in enumerate(sizes):
                yield data[index * WIDTH : (index + 1) * WIDTH], size


NO_SIZE = -(2**63)  # a PackedSizes record without size: no manifest's size (refused there)


class PackedSizes(Sequence["int | None"]):
    """A tuple of sizes (None: no size) as 8-byte records: ~90 B for six sizes, not ~280."""

    __slots__ = ("data",)

    def __init__(self, sizes: Iterable[int | None]) -> None:
        # raises OverflowError past int64 (a hostile manifest): callers keep the tuple then
        self.data = array("q", (NO_SIZE if s is None else s for s in sizes)).tobytes()

    def __len__(self) -> int:
        return len(self.data) // 8

    @overload
    def __getitem__(self, i: int) -> int | None: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[int | None]: ...
    def __getitem__(self, i: int | slice) -> int | Sequence[int | None] | None:
        values = array("q", self.data)
        if isinstance(i, slice):
            return tuple(None if v == NO_SIZE else v for v in values[i])
        value = values[i]
        return None if value == NO_SIZE else value

    def __iter__(self) -> Iterator[int | None]:
        return (None if v == NO_SIZE else v for v in array("q", self.data))


def _index_unsorted(data: bytes | bytearray, value: bytes) -> int:
    """The record index of ``value`` in the unsorted 32-byte records ``data``, or -1."""
    at = data.find(value)
    while at >= 0:
        if at % WIDTH == 0:
            return at // WIDTH
        at = data.find(value, at + 1)
    return -1


class DigestMap:
    """Digests, each with an int64 value (a ``dict[bytes, int]`` at ~40 B an item, not
    ~150): per shard a sorted buffer and an aligned ``array('q')``, and an unsorted tail
    merged in when it passes an eighth of the shard."""

    __slots__ = ("_runs", "_tail_values", "_tails", "_values")

    def __init__(self) -> None:
        self._runs: list[bytes] = [b""] * 256
        self._values: list[array[int]] = [array("q") for _ in range(256)]
        self._tails: list[bytearray] = [bytearray() for _ in range(256)]
        self._tail_values: list[array[int]] = [array("q") for _ in range(256)]

    def _find(self, raw: bytes) -> tuple[array[int] | None, int]:
        """The array holding ``raw``'s value and its index there (None: not held)."""
        shard = raw[0]
        found, at = find_sorted(self._runs[shard], raw)
        if found:
            return self._values[shard], at
        at = _index_unsorted(self._tails[shard], raw)
        return (self._tail_values[shard], at) if at >= 0 else (None, 0)

    def get(self, raw: bytes, default: int | None = None) -> int | None:
        if not isinstance(raw, bytes) or len(raw) != WIDTH:
            return default
        values, at = self._find(raw)
        return default if values is None else values[at]

    def __contains__(self, raw: object) -> bool:
        return isinstance(raw, bytes) and len(raw) == WIDTH and self._find(raw)[0] is not None

    def __setitem__(self, raw: bytes, value: int) -> None:
        if len(raw) != WIDTH:
            raise ValueError("a DigestMap is keyed by 32-byte digests")
        values, at = self._find(raw)
        if values is not None:
            values[at] = value
            return
        shard = raw[0]
        self._tails[shard] += raw
        self._tail_values[shard].append(value)
        if len(self._tails[shard]) > max(64 * WIDTH, len(self._runs[shard]) >> 3):
            self._merge(shard)

    def _merge(self, shard: int) -> None:
        tail = self._tails[shard]
        if not tail:
            return
        pairs = sorted(
            [
                *zip(records(self._runs[shard]), self._values[shard], strict=True),
                *zip(records(bytes(tail)), self._tail_values[shard], strict=True),
            ]
        )
        self._runs[shard] = b"".join(raw for raw, _v in pairs)
        self._values[shard] = array("q", (v for _raw, v in pairs))
        self._tails[shard] = bytearray()
        self._tail_values[shard] = array("q")

    def __len__(self) -> int:
        return (sum(map(len, self._runs)) + sum(map(len, self._tails))) // WIDTH

    def shard_items(self, shard: int) -> Iterator[tuple[bytes, int]]:
        """(digest, value) of every digest whose first byte is ``shard``, in byte order."""
        self._merge(shard)
        data = self._runs[shard]
        for index, value in enumerate(self._values[shard]):
            yield data[index * WIDTH : (index + 1) * WIDTH], value

    def items(self) -> Iterator[tuple[bytes, int]]:
        """Every (digest, value), in byte order."""
        for shard in range(256):
            yield from self.shard_items(shard)


class _ShardDicts:
    """``DigestMap``'s interface over a dict a shard: ~100 B an item, lookups in C."""

    __slots__ = ("_shards",)

    def __init__(self) -> None:
        self._shards: list[dict[bytes, int]] = [{} for _ in range(256)]

    def get(self, raw: bytes, default: int | None = None) -> int | None:
        return self._shards[raw[0]].get(raw, default)

    def __setitem__(self, raw: bytes, value: int) -> None:
        self._shards[raw[0]][raw] = value

    def shard_items(self, shard: int) -> Iterator[tuple[bytes, int]]:
        return iter(sorted(self._shards[shard].items()))


class BaseMap:
    """Digests with int64 values over a base of sorted shards (a delete run's in-use set):
    a digest of the base costs a 4-byte slot and no copy of itself; one outside the base, or
    a value past int32, waits in a ``DigestMap``."""

    __slots__ = ("_base", "_others", "_slots")
    _ABSENT = -(2**31)
    _ELSEWHERE = -(2**31) + 1  # the value is in ``_others``

    def __init__(self, base: Sequence[bytes] = ()) -> None:
        self._base = list(base) or [b""] * 256
        if len(self._base) != 256 or any(len(data) % WIDTH for data in self._base):
            raise ValueError("a base is 256 shards of 32-byte digests")
        self._slots = [array("i", [self._ABSENT]) * (len(d) // WIDTH) for d in self._base]
        # with a base (a delete's verification) few digests fall outside it; without one (a
        # plain verify, whose memory no goal bounds) every digest does, and a dict lookup
        # costs a twentieth of a bisect through Python calls (500k: verify 2.6x a check's
        # CPU with a DigestMap here)
        self._others: DigestMap | _ShardDicts = DigestMap() if base else _ShardDicts()

    def get(self, raw: bytes, default: int | None = None) -> int | None:
        if not isinstance(raw, bytes) or len(raw) != WIDTH:
            return default
        base = self._base[raw[0]]
        # no bisect of an empty shard (a plain verify's every lookup: ~2 us of Python each)
        found, at = find_sorted(base, raw) if base else (False, 0)
        if found:
            value = self._slots[raw[0]][at]
            if value == self._ABSENT:
                return default
            if value != self._ELSEWHERE:
                return value
        return self._others.get(raw, default)

    def __contains__(self, raw: object) -> bool:
        return isinstance(raw, bytes) and self.get(raw) is not None

    def __setitem__(self, raw: bytes, value: int) -> None:
        if len(raw) != WIDTH:
            raise ValueError("a BaseMap is keyed by 32-byte digests")
        base = self._base[raw[0]]
        found, at = find_sorted(base, raw) if base else (False, 0)
        if found:
            slots = self._slots[raw[0]]
            # once elsewhere, a digest stays there: the map never holds it twice
            if slots[at] != self._ELSEWHERE and self._ELSEWHERE < value < 2**31:
                slots[at] = value
                return
            slots[at] = self._ELSEWHERE
        self._others[raw] = value

    def shard_items(self, shard: int) -> Iterator[tuple[bytes, int, bool]]:
        """(digest, value, in the base) of every digest held of a shard, in byte order."""
        base, slots = self._base[shard], self._slots[shard]
        others = (
            (raw, value)
            for raw, value in self._others.shard_items(shard)
            if not find_sorted(base, raw)[0]  # a base digest's value comes with its slot
        )
        theirs = next(others, None)
        for index, slot in enumerate(slots):
            if slot == self._ABSENT:
                continue
            raw = base[index * WIDTH : (index + 1) * WIDTH]
            while theirs is not None and theirs[0] < raw:
                yield theirs[0], theirs[1], False
                theirs = next(others, None)
            value = self._others.get(raw) if slot == self._ELSEWHERE else slot
            assert value is not None
            yield raw, value, True
        while theirs is not None:
            yield theirs[0], theirs[1], False
            theirs = next(others, None)

    def items(self) -> Iterator[tuple[bytes, int]]:
        """Every (digest, value), in byte order."""
        for shard in range(256):
            for raw, value, _in_base in self.shard_items(shard):
                yield raw, value


class ShardRecords:
    """Fixed-width records by shard (their first byte), added a shard's bytes at a time and
    taken back a shard at a time: in memory, or with ``spill`` in an anonymous temporary
    file (unlinked at once: nothing is left after a crash), a block a shard buffered in
    memory (issue 19)."""

    __slots__ = ("_block", "_blocks", "_buffers", "_end", "_file", "width")

    def __init__(
        self,
        width: int,
        *,
        spill: bool = False,
        directory: str | os.PathLike[str] | None = None,
        prefix: str = "registry-pruned-records-",
    ) -> None:
        self.width = width
        self._block = 4096 // width * width  # bytes a shard buffers before a write
        self._buffers = [bytearray() for _ in range(256)]
        self._blocks: list[array[int]] = [array("q") for _ in range(256)]  # offset, length
        self._end = 0
        # ``directory`` is the state dir in the daemon: the image's root (and /tmp) is
        # read-only, and a memory-backed /tmp would count the file against the very limit
        # the spill is for
        self._file = (
            tempfile.TemporaryFile(prefix=prefix, dir=directory)  # noqa: SIM115
            if spill
            else None
        )

    def extend(self, shard: int, data: bytes) -> None:
        """Records of one shard (each must begin with that byte)."""
        if len(data) % self.width:
            raise ValueError(f"records of {self.width} bytes")
        buffer = self._buffers[shard]
        buffer += data
        if self._file is not None and len(buffer) >= self._block:
            self._write(shard)

    def add(self, record: bytes) -> None:
        """One record, to its shard (its first byte); no width check: the hot path of the
        mark's spill and the scan's layer links."""
        buffer = self._buffers[record[0]]
        buffer += record
        if self._file is not None and len(buffer) >= self._block:
            self._write(record[0])

    def _write(self, shard: int) -> None:
        assert self._file is not None
        buffer = self._buffers[shard]
        os.pwrite(self._file.fileno(), buffer, self._end)
        self._blocks[shard].extend((self._end, len(buffer)))
        self._end += len(buffer)
        self._buffers[shard] = bytearray()

    def _stored(self, shard: int) -> list[bytes]:
        blocks = self._blocks[shard]
        if self._file is None:
            return []
        parts = [
            os.pread(self._file.fileno(), blocks[i + 1], blocks[i])
            for i in range(0, len(blocks), 2)
        ]
        if any(len(part) != blocks[2 * i + 1] for i, part in enumerate(parts)):
            raise OSError("the records file came back short")
        return parts

    def read(self, shard: int) -> bytes:
        """Every record of a shard added since it was last taken (they stay)."""
        return b"".join([*self._stored(shard), bytes(self._buffers[shard])])

    def take(self, shard: int) -> bytes:
        """Every record of a shard added since it was last taken, in the order added."""
        data = self.read(shard)
        self._blocks[shard] = array("q")
        self._buffers[shard] = bytearray()
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Spill(ShardRecords):
    """32-byte records by shard in an unlinked file, read back a shard at a time: a set that
    is only added to until it is sorted holds a few KiB a shard instead of every record."""

    __slots__ = ()

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        super().__init__(WIDTH, spill=True, directory=directory, prefix="registry-pruned-spill-")


class SpilledDigests:
    """32-byte digests added a sorted shard at a time to ``ShardRecords`` (a delete's deleted
    digests, asked only about the rare loose digest strings): a lookup reads its shard back,
    so the set holds ~8 KiB of memory while the verification runs, not 32 B a digest."""

    __slots__ = ("_last", "_records")

    def __init__(self, records: ShardRecords) -> None:
        if records.width != WIDTH:
            raise ValueError("a SpilledDigests holds 32-byte records")
        self._records = records
        self._last: tuple[int, bytes] = (-1, b"")  # the shard read last, sorted

    def add_shard(self, shard: int, data: bytes) -> None:
        """One shard's digests, sorted and each once (a shard is added once)."""
        self._records.extend(shard, data)

    def __contains__(self, raw: object) -> bool:
        if not isinstance(raw, bytes) or len(raw) != WIDTH:
            return False
        shard, data = self._last
        if shard != raw[0]:
            data = self._records.read(raw[0])
            self._last = (raw[0], data)
        return find_sorted(data, raw)[0]

    def close(self) -> None:
        self._records.close()
