"""What verify holds of the manifests it read: a few bytes a manifest (issue 19).

A plain image (blobs with their sizes, nothing else: nearly every manifest) is held as its
length; its blobs go to a ``BlobWants`` as it is read, and are judged there a shard at a
time. A manifest with children, a subject, foreign or loose digests, digests in annotations
or a parse error keeps its ``Facts``. Only when a referenced blob is missing or of another
size are the plain manifests read again, to name the images it breaks.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence

from daemon import layout, packed
from daemon.inventory import Inventory
from daemon.verifying import Facts

CLAIMED = -1  # a worker is reading it
UNREADABLE = -2  # read, no facts: no data, or the driver could not read it


def compact(facts: Facts) -> Facts:
    """Facts as held until judged: sizes as 8-byte records, not int objects."""
    sizes: Sequence[int | None] = facts.sizes
    if packed.NO_SIZE not in sizes:
        with contextlib.suppress(OverflowError):  # past int64: kept as they are
            sizes = packed.PackedSizes(sizes)
    return facts._replace(kind=sys.intern(facts.kind), sizes=sizes)


def is_plain(facts: Facts) -> bool:
    """Blobs and sizes only: judged from ``BlobWants`` alone, unless a blob is bad."""
    return not (
        facts.children
        or facts.subjects
        or facts.foreign
        or facts.loose
        or facts.noted
        or facts.error
    )


class HeldFacts:
    """The manifests verify read: a length each (``DigestMap``), the wanted blobs, and whole
    ``Facts`` only for the few that are not plain images."""

    def __init__(self, base: Sequence[bytes] = ()) -> None:
        # over a delete run's in-use set (``base``), which holds every manifest it read and
        # nearly every blob they reference: 4 bytes a manifest, 4 a referenced blob
        self.lengths = packed.BaseMap(base)  # length, CLAIMED or UNREADABLE
        self.rich: dict[bytes, Facts] = {}
        #: plain manifests read again because they name a missing or mis-sized blob
        self.again: dict[bytes, Facts | None] = {}
        self.wants = packed.BlobWants(base)
        self.loose = packed.BlobSizes()  # sha256 digests of loose strings: have they data?

    def __contains__(self, raw: object) -> bool:
        return raw in self.lengths

    def claim(self, raws: Iterable[bytes]) -> None:
        """Mark manifests as being read (no other worker reads them)."""
        for raw in raws:
            self.lengths[raw] = CLAIMED

    def store(self, raw: bytes, facts: Facts | None) -> None:
        """One manifest's reading: its blobs wanted, its length held (its facts if not plain)."""
        if facts is None:
            self.lengths[raw] = UNREADABLE
            return
        sizes = facts.sizes
        for index, blob in enumerate(packed.records(facts.blobs)):
            self.wants.want(blob, sizes[index] if index < len(sizes) else None)
        for text in facts.loose:
            if text.startswith("sha256:"):
                self.loose.add_packed(layout.parse_digest(text))
        self.lengths[raw] = facts.length
        if not is_plain(facts):
            self.rich[raw] = compact(facts)

    def keep_again(self, raw: bytes, facts: Facts | None) -> None:
        self.again[raw] = None if facts is None else compact(facts)

    def get(self, raw: bytes) -> Facts | None:
        """The manifest's facts; a plain one's without blobs (they were judged as wanted),
        unless it was read again."""
        if raw in self.again:
            return self.again[raw]
        found = self.rich.get(raw)
        if found is not None:
            return found
        length = self.lengths.get(raw)
        return None if length is None or length < 0 else Facts(length)

    def read(self) -> int:
        """How many manifests were read with facts."""
        return sum(1 for _raw, length in self.lengths.items() if length >= 0)

    def plain(self) -> Iterator[bytes]:
        """The plain manifests, in byte order."""
        for raw, length in self.lengths.items():
            if length >= 0 and raw not in self.rich:
                yield raw


class Presence:
    """Which referenced blobs have data of the wanted size, once each shard is judged: only
    the bad ones are held (a good one reads as UNSIZED: nothing to report)."""

    def __init__(self, held: HeldFacts) -> None:
        self.held = held
        self.bad: dict[bytes, int] = {}  # digest -> its size, or MISSING

    def judge(self, raw: bytes, slot: int, size: int) -> None:
        if not self.held.wants.fits(raw, slot, size):
            self.bad[raw] = size

    def get(self, raw: bytes) -> int:
        """MISSING, UNSIZED (present as wanted), or the size of a mis-sized blob."""
        if raw in self.bad:
            return self.bad[raw]
        if self.held.wants.slot(raw) != packed.UNWANTED:
            return packed.UNSIZED
        return self.held.loose.get(raw)

    def __contains__(self, raw: object) -> bool:
        """Whether the digest has data."""
        return isinstance(raw, bytes) and len(raw) == 32 and self.get(raw) != packed.MISSING


class Roots:
    """Per repository, the manifests verify judges: its revisions the scan listed whose link
    was read and names them (the inventory's own sorted set, not a copy: issue 19), less
    the few that were not, plus its tags' manifests that are no such revision."""

    def __init__(self, inventory: Inventory, removed: Callable[[str, str], bool]) -> None:
        self.inventory = inventory
        self.removed = removed  # (repository, hex): revisions a delete removed, not read
        self.dropped: set[tuple[str, bytes]] = set()  # listed, but no good link
        self.extra: dict[str, packed.HexSet] = {}  # tagged manifests that are no revision

    def revision(self, repo: str, raw: bytes) -> bool:
        """Whether ``raw`` is a linked revision of ``repo`` (every revision read)."""
        held = self.inventory.repositories.get(repo)
        return (
            held is not None
            and held.revisions.contains_raw(raw)
            and (repo, raw) not in self.dropped
            and not self.removed(repo, raw.hex())
        )

    def add_tagged(self, repo: str, raw: bytes) -> None:
        held = self.extra.setdefault(repo, packed.HexSet())
        if not held.contains_raw(raw):
            held.add_raw(raw)

    def __contains__(self, pair: tuple[str, bytes]) -> bool:
        repo, raw = pair
        extra = self.extra.get(repo)
        return self.revision(repo, raw) or (extra is not None and extra.contains_raw(raw))

    def names(self) -> list[str]:
        """Repositories that may hold roots, sorted (``of`` says which)."""
        return sorted({*self.inventory.repositories, *self.extra})

    def of(self, repo: str) -> list[bytes]:
        """A repository's roots, in byte order."""
        held = self.inventory.repositories.get(repo)
        found = [raw for raw in held.revisions.raws() if self.revision(repo, raw)] if held else []
        extra = self.extra.get(repo)
        return sorted({*found, *extra.raws()}) if extra is not None else found
