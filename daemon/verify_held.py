"""What verify holds of the manifests it read: a few bytes a manifest (issue 19).

A plain image (blobs with their sizes, nothing else: nearly every manifest) is held as its
length; the reader that parsed it sends its blobs' (digest, wanted size) records by blob
shard (``verifying.Chunk``), which wait in ``packed.ShardRecords`` (a delete's in the state
dir's records file) and are judged a shard at a time. A manifest with children, a subject,
foreign or loose digests, digests in annotations or a parse error keeps its ``Facts``. Only
when a referenced blob is missing or of another size are the plain manifests read again, to
name the images it breaks.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence

from daemon import layout, packed
from daemon.inventory import Inventory
from daemon.verifying import Facts, is_plain

CLAIMED = -1  # a worker is reading it
UNREADABLE = -2  # read, no facts: no data, or the driver could not read it


def compact(facts: Facts) -> Facts:
    """Facts as held until judged: sizes as 8-byte records, not int objects."""
    sizes: Sequence[int | None] = facts.sizes
    if packed.NO_SIZE not in sizes:
        with contextlib.suppress(OverflowError):  # past int64: kept as they are
            sizes = packed.PackedSizes(sizes)
    return facts._replace(kind=sys.intern(facts.kind), sizes=sizes)


class HeldFacts:
    """The manifests verify read: a length each (``BaseMap``), and whole ``Facts`` only for
    the few that are not plain images."""

    def __init__(self, base: Sequence[bytes] = ()) -> None:
        # over a delete run's in-use set (``base``), which holds every manifest it read and
        # the blobs they reference: 4 bytes a manifest
        self.lengths = packed.BaseMap(base)  # length, CLAIMED or UNREADABLE
        self.rich: dict[bytes, Facts] = {}
        #: plain manifests read again because they name a missing or mis-sized blob
        self.again: dict[bytes, Facts | None] = {}
        self.loose = packed.BlobSizes()  # sha256 digests of loose strings: have they data?

    def __contains__(self, raw: object) -> bool:
        return raw in self.lengths

    def claim(self, raws: Iterable[bytes]) -> None:
        """Mark manifests as being read (no other worker reads them)."""
        for raw in raws:
            self.lengths[raw] = CLAIMED

    def store(self, raw: bytes, facts: Facts | int | None) -> None:
        """One manifest's reading: a plain one's length, else its ``Facts`` (None: no data, or
        unreadable). Its blobs' records went to the run's ``ShardRecords`` with its chunk."""
        if facts is None:
            self.lengths[raw] = UNREADABLE
            return
        if isinstance(facts, int):
            self.lengths[raw] = facts
            return
        for text in facts.loose:
            if text.startswith("sha256:"):
                self.loose.add_packed(layout.parse_digest(text))
        self.lengths[raw] = facts.length
        if not is_plain(facts):
            self.rich[raw] = compact(facts)

    def judged(self, raw: bytes) -> bool:
        """Whether ``raw`` was read as a plain image, and not read again: nothing to judge."""
        length = self.lengths.get(raw)
        return length is not None and length >= 0 and raw not in self.rich and raw not in self.again

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
    the bad ones are held (a referenced blob not among them is as its descriptors want)."""

    def __init__(self, held: HeldFacts) -> None:
        self.held = held
        self.bad: dict[bytes, int] = {}  # digest -> its size, or MISSING

    def blob(self, raw: bytes) -> int:
        """Of a blob some manifest references: MISSING, its size where some descriptor
        wants another, else UNSIZED (present as wanted)."""
        return self.bad.get(raw, packed.UNSIZED)

    def __contains__(self, raw: object) -> bool:
        """Whether a loose digest string's blob has data."""
        if not isinstance(raw, bytes) or len(raw) != 32:
            return False
        if raw in self.bad:
            return self.bad[raw] != packed.MISSING
        return self.held.loose.get(raw) != packed.MISSING


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
        return held is not None and held.revisions.contains_raw(raw) and self.kept(repo, raw)

    def revisions_of(self, repos: Iterable[str]) -> dict[str, frozenset[bytes]]:
        """The revisions the scan listed of a few repositories, as sets made in C (a tag
        chunk's: a lookup a tag, where ``revision`` bisects in Python); ``kept`` says which
        of them are roots."""
        out: dict[str, frozenset[bytes]] = {}
        for repo in repos:
            held = self.inventory.repositories.get(repo)
            out[repo] = frozenset(held.revisions.raws() if held is not None else ())
        return out

    def kept(self, repo: str, raw: bytes) -> bool:
        """Whether a listed revision's link was read and names it, and no delete removed it."""
        return (repo, raw) not in self.dropped and not self.removed(repo, raw.hex())

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
        # each is a revision by its origin: no lookup in the revisions again (a bisect a root)
        found = [raw for raw in held.revisions.raws() if self.kept(repo, raw)] if held else []
        extra = self.extra.get(repo)
        return sorted({*found, *extra.raws()}) if extra is not None else found
