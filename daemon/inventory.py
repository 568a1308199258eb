"""What the repositories/ tree holds: one walk of the store, grouped per repository.

Also the compact set of in-use digests the mark phase fills and the sweep reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, MutableSet
from dataclasses import dataclass, field

from daemon import layout, packed

_PREFIX = len(layout.REPOSITORIES)
_HEX_AT = re.compile(r"[0-9a-f]{64}")  # fullmatch(key, start, end): no slice to make
# names the fast path may take as they are: no empty, dot-led or "_" component (those could be
# a section name or climb out of the tree: layout.classify_repo_key decides them)
_PLAIN_NAME = re.compile(r"[^/_.][^/_]*(?:/[^/_.][^/_]*)*")
_MERGES_PER_FLUSH = 8
_RECORDS = re.compile(rb".{32}", re.DOTALL)  # 32-byte records, split in C
_LAYER_TAIL = "/_layers/sha256/"  # then <hex>/link
_REVISION_TAIL = "/_manifests/revisions/sha256/"  # then <hex>/link
_TAG_TAIL = "/_manifests/tags/"  # then <tag>/current/link


@dataclass(slots=True)
class Repository:
    name: str
    #: its number in the inventory, 4 bytes little-endian: what a layer link's record names
    number: bytes = bytes(4)
    #: hex of revisions whose link exists, held as sorted raw digests (32 bytes each, where
    #: a set of hex strings took ~160)
    revisions: packed.HexSet = field(default_factory=packed.HexSet)
    tags: packed.NameSet = field(default_factory=packed.NameSet)  # one '/'-joined string
    #: "<algorithm>:<hex>" of _layers links named by sha384/sha512 (only when the inventory
    #: keeps layers): each holds the sha256 digest of the blob it stands for
    foreign_layers: list[str] = field(default_factory=list)
    uploads: set[str] = field(default_factory=set)  # upload uuids
    uploads_started: set[str] = field(default_factory=set)  # uuids that have a startedat file


@dataclass(slots=True)
class Inventory:
    repositories: dict[str, Repository] = field(default_factory=dict)
    #: keys under repositories/ that the scheme does not name (reported, never deleted)
    unknown: int = 0
    #: _layers links are only needed to unlink deleted blobs; a check does not hold them
    keep_layers: bool = True
    #: bytes kept of each _layers link's digest: 32, or a prefix (8) where the links are only
    #: matched against the doomed blobs (``layer_links``) and wait in memory
    layer_width: int = 32
    #: the _layers links, a record each (the digest's ``layer_width`` bytes, then the
    #: repository's ``number``) by shard; made with a spill, they wait in an unlinked file of
    #: the state dir: a 1M-blob delete held 7.5 MB of them from the scan to the delete's end
    #: (issue 19)
    layer_records: packed.ShardRecords | None = None
    _names: list[str] = field(default_factory=list)
    _shard: tuple[int, dict[bytes, list[bytes]]] = (-1, {})  # the links of the shard read last

    def __post_init__(self) -> None:
        if self.keep_layers and self.layer_records is None:
            self.layer_records = packed.ShardRecords(self.layer_width + 4)

    def repo(self, name: str) -> Repository:
        found = self.repositories.get(name)
        if found is None:
            number = len(self._names).to_bytes(4, "little")
            found = self.repositories[name] = Repository(name, number)
            self._names.append(name)
        return found

    def add_key(self, key: str) -> None:
        self.add_keys((key,))

    def add_keys(self, keys: Iterable[str]) -> None:
        """Classify keys under repositories/ into the inventory."""
        # the common link shapes are recognised by their fixed tails, inline: the general
        # classifier was most of the scan phase's time in profiles (a key per link)
        hexmatch = _HEX_AT.fullmatch
        plain = _PLAIN_NAME.fullmatch
        repos = self.repositories
        layer = self.layer_records.add if self.layer_records is not None else None
        hex_end = -69 + 2 * self.layer_width  # the kept part of a layer link's hex
        # keys come a repository at a time: its name is checked once, not once a key
        last_name, last_repo = "", None
        for key in keys:
            end = len(key)
            if key[-5:] == "/link" and key[:_PREFIX] == layout.REPOSITORIES:
                # the tail's length says where the repository name ends
                if key[-85:-69] == _LAYER_TAIL:
                    cut = 85
                elif key[-98:-69] == _REVISION_TAIL:
                    cut = 98
                else:
                    cut = 0
                if cut:
                    name = key[_PREFIX:-cut]
                    if name == last_name and last_repo is not None:
                        repo = last_repo
                    elif plain(name):
                        repo = last_repo = repos.get(name) or self.repo(name)
                        last_name = name
                    else:
                        repo = None
                    if repo is not None and hexmatch(key, end - 69, end - 5):
                        if cut == 98:
                            repo.revisions.add(key[-69:-5])
                        elif layer is not None:
                            layer(bytes.fromhex(key[-69:hex_end]) + repo.number)
                        continue
                elif key[-13:] == "/current/link":
                    head, _, tag = key[:-13].rpartition("/")
                    if (
                        head[-16:] == _TAG_TAIL[:-1]
                        and tag
                        and plain(head, _PREFIX, len(head) - 16)
                    ):
                        name = head[_PREFIX:-16]
                        (repos.get(name) or self.repo(name)).tags.add(tag)
                        continue
            self._add_general(key)

    def drop_layers(self) -> None:
        """Forget the _layers links (the delete is over): their file goes."""
        if self.layer_records is not None:
            self.layer_records.close()
            self.layer_records = None
        self._shard = (-1, {})

    def layer_links(self, doomed: Iterable[bytes]) -> Iterator[tuple[str, bytes]]:
        """(repository, digest) of each _layers link of a ``doomed`` digest, read a shard at
        a time: the digests come in shard order (a delete's batch), so each shard is read
        once. With prefixes, a link whose prefix only matches names the doomed digest's link,
        which that repository does not have: removing a missing link is a no-op, so a match
        never costs a link."""
        width, names = self.layer_width, self._names
        for raw in doomed:
            shard, links = self._shard
            if shard != raw[0]:
                links = self._links_of_shard(raw[0])
                self._shard = (raw[0], links)
            for number in links.get(raw[:width], ()):
                yield names[int.from_bytes(number, "little")], raw

    def layer_digests(self, name: str) -> list[bytes]:
        """The whole digests of ``name``'s _layers links (``layer_width`` 32), every shard read
        (online mode, for a repository it removes)."""
        repo = self.repositories.get(name)
        if repo is None or self.layer_records is None:
            return []
        found: list[bytes] = []
        for shard in range(256):
            data = self.layer_records.read(shard)
            for record in packed.records(data, self.layer_width + 4):
                if record[-4:] == repo.number:
                    found.append(record[:-4])
        return found

    def _links_of_shard(self, shard: int) -> dict[bytes, list[bytes]]:
        links: dict[bytes, list[bytes]] = {}
        if self.layer_records is not None:
            width = self.layer_width
            for record in packed.records(self.layer_records.read(shard), width + 4):
                links.setdefault(record[:width], []).append(record[width:])
        return links

    def _add_general(self, key: str) -> None:
        kind = layout.classify_repo_key(key)
        if kind is None:
            self.unknown += 1
            return
        repo = self.repo(kind.repository)
        match kind.kind:
            case "revision":
                repo.revisions.add(kind.digest_hex)
            case "layer":
                if self.layer_records is not None:
                    digest = bytes.fromhex(kind.digest_hex)
                    self.layer_records.add(digest[: self.layer_width] + repo.number)
            case "tag_current" | "tag_index":
                repo.tags.add(kind.tag)
            case "upload_startedat":
                repo.uploads.add(kind.upload)
                repo.uploads_started.add(kind.upload)
            case "upload_other":
                repo.uploads.add(kind.upload)
            case "foreign_layer":
                if self.keep_layers:
                    repo.foreign_layers.append(kind.digest_hex)
            case "layers_unlisted" | "foreign_revision":
                # the repository exists; its links were not asked for. A revision linked by
                # another algorithm is only ever read to resolve an index child that names it
                pass


class DigestSet(MutableSet[bytes]):
    """A set of 32-byte sha256 digests in about 32-40 bytes each (a ``set[bytes]``: ~110).

    New digests gather in a small plain set (duplicates, a base layer named by every
    manifest, vanish there at C speed); full, it is spread over 256 shards by first byte
    (the blob store's own shards) as unsorted 32-byte records, merged into the shard's
    sorted, deduplicated buffer when they pass an eighth of it. A shard is handed out as a
    ``PackedShard`` over that buffer, without a copy: the sweep's lookups bisect it, or walk
    it forward against a sorted listing. Exact, not probabilistic.
    """

    _FLUSH = 1 << 13  # the plain set's peak: ~110 bytes an entry

    def __init__(
        self,
        items: Iterable[bytes] = (),
        *,
        spill: packed.Spill | None = None,
        lookups: bool = False,
    ) -> None:
        self._pending: set[bytes] = set()
        self._runs: list[bytes] = [b""] * 256  # sorted, each digest once
        self._tails: list[bytearray] = [bytearray() for _ in range(256)]  # not yet merged
        #: with ``lookups``, a filter: two bits (hashes: digest bytes 1-4 and 5-8) of 16 a
        #: digest flushed, so that ~98% of the lookups of a digest not held end there, in
        #: C. Each costs a scan of its shard's tail and a bisect of its run otherwise, ~log2
        #: (n) Python calls: the mark's ``seen``, asked once a revision, grew 14x in CPU
        #: from 1M to 4M blobs (issue 19's 10M/1M time ratio). A hit asks the tail and the
        #: run, so answers stay exact
        if lookups and spill is not None:
            raise ValueError("a spilled DigestSet has no lookups to filter until it is sorted")
        self._lookups = lookups
        self._bits = bytearray(1 << 13) if lookups else bytearray()
        self._flushed = 0
        self._cursor = 0  # where the next flush starts looking for shards to merge
        #: with a ``spill``, until the first lookup or settle, digests go to its file
        #: and are sorted once a shard at a time (the mark's in-use set: ~0 B a digest
        #: while it is filled, and one sort a shard where the merges sorted it again and
        #: again)
        self._spill = spill
        self.update(items)

    def add(self, value: bytes) -> None:
        self._pending.add(value)
        if len(self._pending) >= self._FLUSH:
            self._flush()

    def update(self, values: Iterable[bytes]) -> None:
        self._pending.update(values)
        if len(self._pending) >= self._FLUSH:
            self._flush()

    def update_packed(self, packed: bytes) -> None:
        """Add the 32-byte digests concatenated in ``packed``."""
        if len(packed) % 32:
            raise ValueError("a DigestSet holds 32-byte digests")
        self.update(_RECORDS.findall(packed))

    @staticmethod
    def _due(run: bytes, tail: bytearray) -> bool:
        # amortised: the unmerged part may grow to an eighth of the merged one, so a digest
        # costs at most ~36 bytes, and a merge's sort is a few per cent of the mark
        return len(tail) > max(64 * 32, len(run) >> 3)

    def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        # one short record would shift every later one in its shard: refuse it outright
        # (and keep what was pending: a caller that goes on must not lose digests)
        if set(map(type, pending)) != {bytes} or set(map(len, pending)) != {32}:
            raise ValueError("a DigestSet holds 32-byte digests")
        self._pending = set()
        if self._spill is not None:
            add = self._spill.add
            for value in pending:
                add(value)
            return
        tails, runs = self._tails, self._runs
        if self._lookups:
            self._flushed += len(pending)
            if 2 * self._flushed > len(self._bits):  # past 16 bits a digest: twice the bits
                self._grow_bits()
            self._set_bits(pending)
        for value in pending:
            tails[value[0]] += value
        # shards fill alike and would all come due in one flush: merging 256 at once held
        # the event loop for a few hundred ms (status p99); a few per flush, round robin
        merges = 0
        for _ in range(256):
            shard = self._cursor = (self._cursor + 1) % 256
            if self._due(runs[shard], tails[shard]):
                self._merge(shard)
                merges += 1
                if merges == _MERGES_PER_FLUSH:
                    break

    def _set_bits(self, values: Iterable[bytes]) -> None:
        bits, mask = self._bits, len(self._bits) * 8 - 1
        for value in values:
            at = int.from_bytes(value[1:5], "big") & mask
            bits[at >> 3] |= 1 << (at & 7)
            at = int.from_bytes(value[5:9], "big") & mask
            bits[at >> 3] |= 1 << (at & 7)

    def _maybe(self, value: bytes) -> bool:
        """Whether the filter lets ``value`` through (always, for one flushed)."""
        bits, mask = self._bits, len(self._bits) * 8 - 1
        at = int.from_bytes(value[1:5], "big") & mask
        if not bits[at >> 3] & (1 << (at & 7)):
            return False
        at = int.from_bytes(value[5:9], "big") & mask
        return bool(bits[at >> 3] & (1 << (at & 7)))

    def _grow_bits(self) -> None:
        size = len(self._bits)
        while size < 2 * self._flushed:
            size *= 2
        self._bits = bytearray(size)
        for shard in range(256):
            self._set_bits(_RECORDS.findall(self._runs[shard]))
            self._set_bits(_RECORDS.findall(self._tails[shard]))

    def _merge(self, shard: int) -> bytes:
        tail = self._tails[shard]
        spilled = self._spill.take(shard) if self._spill is not None else b""
        if tail or spilled:
            self._runs[shard] = packed.sorted_unique(self._runs[shard], tail, spilled)
            self._tails[shard] = bytearray()
        return self._runs[shard]

    def _settle(self) -> None:
        for _ in self.settle_steps():
            pass

    def settle_steps(self) -> Iterator[int]:
        """Merge everything, a shard a step: an async caller yields to its loop in between."""
        self._flush()
        for shard in range(256):
            self._merge(shard)
            yield shard
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def shard(self, shard: int) -> packed.PackedShard:
        """Every digest whose first byte is ``shard``: a set over the shard's sorted buffer."""
        self._flush()
        return packed.PackedShard(self._merge(shard))

    def discard(self, value: bytes) -> None:
        if value not in self:
            return
        self._flush()
        shard = value[0]
        run = self._merge(shard)
        _found, at = packed.find_sorted(run, value)
        self._runs[shard] = run[: at * 32] + run[(at + 1) * 32 :]

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, bytes) or len(value) != 32:
            return False
        if self._spill is not None:
            self._settle()  # the spilled digests are sorted in at the first lookup
        if value in self._pending:
            return True
        if self._lookups and not self._maybe(value):
            return False
        shard = value[0]
        return (
            packed.in_unsorted(self._tails[shard], value)
            or packed.find_sorted(self._runs[shard], value)[0]
        )

    def __len__(self) -> int:
        self._settle()
        return sum(len(run) for run in self._runs) // 32

    def __iter__(self) -> Iterator[bytes]:
        self._settle()
        for run in self._runs:
            yield from _RECORDS.findall(run)
