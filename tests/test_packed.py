"""The packed digest structures (daemon/packed.py, DigestSet): exact as plain sets."""

from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon import packed
from daemon.inventory import DigestSet
from daemon.packed import HexSet, NameSet, PackedCandidates, PackedShard, Spill, sorted_unique

RNG = random.Random(19)


def digests(n: int, first: int | None = None) -> list[bytes]:
    out = [RNG.randbytes(32) for _ in range(n)]
    return out if first is None else [bytes((first,)) + d[1:] for d in out]


def test_packed_shard_answers_like_a_set_in_any_order() -> None:
    members = digests(3000, first=0x42)
    others = digests(3000, first=0x42)
    shard = PackedShard(sorted_unique(b"".join(members + members[:100])))
    assert len(shard) == 3000 and set(shard) == set(members)
    everything = members + others
    # ascending (a merge against a sorted listing), descending, and shuffled
    for order in (sorted(everything), sorted(everything, reverse=True), everything):
        assert [d in shard for d in order] == [d in set(members) for d in order]
    # the first and the last digest a shard can hold, and near misses around them
    low, high = b"\x42" + b"\x00" * 31, b"\x42" + b"\xff" * 31
    edge = PackedShard(sorted_unique(low + high + members[0]))
    assert low in edge and high in edge and members[0] in edge
    assert b"\x42" + b"\x00" * 30 + b"\x01" not in edge
    assert b"\x42" + b"\xff" * 30 + b"\xfe" not in edge
    assert b"\x43" + b"\x00" * 31 not in edge  # past the last record
    assert b"\x41" + b"\xff" * 31 not in edge  # before the first
    assert "not bytes" not in edge and b"short" not in edge  # type: ignore[operator]
    # iterated in blocks of 4,096 records: every record, in order, across the blocks' seams
    many = sorted(set(digests(4096 * 2 + 5)))
    assert list(PackedShard(b"".join(many))) == many and list(PackedShard()) == []


def test_packed_shard_edges_and_pickling() -> None:
    empty = PackedShard()
    assert len(empty) == 0 and digests(1)[0] not in empty and list(empty) == []
    one = digests(1)[0]
    single = PackedShard(one)
    assert one in single and bytes(32) not in single
    copied = pickle.loads(pickle.dumps(PackedShard(sorted_unique(b"".join(digests(50))))))
    assert isinstance(copied, PackedShard) and len(copied) == 50
    with pytest.raises(ValueError):
        PackedShard(b"x" * 33)


@pytest.mark.parametrize("lookups", [False, True])
def test_digest_set_edges_first_last_empty_and_one_full_shard(lookups: bool) -> None:
    ours = DigestSet(lookups=lookups)
    assert len(ours) == 0 and all(len(ours.shard(s)) == 0 for s in (0, 128, 255))
    # every digest in one shard: its merges, and the other 255 shards stay empty
    crowded = digests(20_000, first=0x00)
    first, last = bytes(32), b"\x00" + b"\xff" * 31
    ours.update(crowded)
    ours.add(last)
    ours.add(first)
    ours.update(crowded[:5000])  # duplicates after merges
    assert len(ours) == 20_002
    shard = ours.shard(0)
    assert list(shard) == sorted({*crowded, first, last})
    assert first in shard and last in shard and first in ours and last in ours
    assert all(len(ours.shard(s)) == 0 for s in range(1, 256))
    assert b"\x01" + bytes(31) not in ours
    ours.discard(first)
    ours.discard(last)
    assert first not in ours and last not in ours and len(ours) == 20_000


@pytest.mark.parametrize("lookups", [False, True])  # tails as records, or as sets
def test_digest_set_lookups_before_and_after_merges(lookups: bool) -> None:
    ours, plain = DigestSet(lookups=lookups), set()
    values = digests(40_000)
    probes = values + digests(2000)
    for i, value in enumerate(values):
        ours.add(value)
        plain.add(value)
        if i % 7919 == 0:  # pending, unmerged tails and merged runs all answer
            assert all((p in ours) == (p in plain) for p in probes[:3000])
    assert all((p in ours) == (p in plain) for p in probes)
    assert sorted(ours) == sorted(plain)
    for s in (0, 1, 0x80, 0xFE, 0xFF):
        assert ours.shard(s) == {v for v in plain if v[0] == s}
    ours.add(b"too short")
    with pytest.raises(ValueError):  # refused at the latest when it would be packed
        len(ours)


def test_hex_set_and_name_set() -> None:
    raws = digests(500)
    revisions = HexSet(r.hex() for r in raws[:300])
    for raw in raws[250:]:
        revisions.add_raw(raw)
    assert len(revisions) == 500 and list(revisions) == sorted(r.hex() for r in raws)
    assert raws[0].hex() in revisions and digests(1)[0].hex() not in revisions
    assert "zz" not in revisions and 5 not in revisions  # type: ignore[operator]
    revisions.discard(raws[0].hex())
    assert raws[0].hex() not in revisions and len(revisions) == 499
    assert revisions & {raws[1].hex(), "x"} == {raws[1].hex()}
    revisions.update([raws[0].hex(), raws[1].hex()])  # as a set's update
    assert len(revisions) == 500
    tags = NameSet()
    for i in range(100):
        tags.add(f"v{i % 40}")
    assert len(tags) == 40 and "v3" in tags and "v41" not in tags
    assert list(tags) == sorted(f"v{i}" for i in range(40))
    tags.discard("v3")
    assert "v3" not in tags and len(tags) == 39 and len(NameSet()) == 0
    tags.update(["v3", "v4"])
    assert "v3" in tags and len(tags) == 40
    tags.discard("v3")
    with pytest.raises(ValueError):
        tags.add("a/b")
    tags.add("")  # an object store's key may hold an empty component: a set kept it too
    assert "" in tags and len(tags) == 40 and next(iter(tags)) == ""


@dataclass(frozen=True)
class _Cand:
    digest: bytes
    size: int


@pytest.mark.parametrize("spill", [False, True])
def test_packed_candidates_keep_every_candidate_and_slice_in_shard_order(
    spill: bool, tmp_path: Path
) -> None:
    """Candidates in memory or in a file of the state dir (a delete's, issue 19) come back
    alike: every one, in shard order, in batches that cross shards."""
    records = packed.ShardRecords(40, spill=spill, directory=tmp_path)
    made = PackedCandidates(_Cand, records)
    assert not made and len(made) == 0 and made[0:1000] == [] and len(made.digests()) == 0
    wanted = [_Cand(d, i * 1000 + 7) for i, d in enumerate(digests(2500))]
    wanted.append(_Cand(bytes(32), 2**40))  # the first digest there is, a large size
    wanted.append(_Cand(b"\xff" * 32, 0))  # the last
    # one shard past a block of records (4,080 bytes), so a spilled one is read from its file
    wanted += [_Cand(b"\x42" + d[1:], 3) for d in digests(300)]
    for c in wanted:
        made.append(c)
    assert len(made) == len(wanted) and made
    assert os.listdir(tmp_path) == []  # the spill file is unlinked from the start
    batches = [made[i : i + 1000] for i in range(0, len(made), 1000)]
    got = [c for batch in batches for c in batch]
    assert sorted(got, key=lambda c: c.digest) == sorted(wanted, key=lambda c: c.digest)
    assert [c.digest[0] for c in got] == sorted(c.digest[0] for c in got)  # shard order
    assert list(made) == got and made[-1] == got[-1]
    doomed = made.digests()
    assert all(c.digest in doomed for c in wanted) and digests(1)[0] not in doomed
    taken = made.digests(take=True)  # the same digests; the candidates are forgotten
    assert taken.data == doomed.data and len(made) == 0 and not made and list(made) == []
    made.append(wanted[0])  # taken shards are empty, and fill again
    assert list(made) == [wanted[0]] and made.digests().data == wanted[0].digest
    made.close()
    assert os.listdir(tmp_path) == [] and not made  # an unlinked file: nothing left behind
    with pytest.raises(ValueError):
        PackedCandidates(_Cand, packed.ShardRecords(32))
    # the digests hand out bytes (hashable), whatever buffer holds them
    assert all(type(raw) is bytes for raw in doomed)
    assert doomed.starting_with(bytes(8)) == [bytes(32)] and type(next(iter(doomed))) is bytes


@pytest.mark.parametrize("spill", [False, True])
def test_deleted_digests_spilled_answer_like_a_set(spill: bool, tmp_path: Path) -> None:
    """A delete's digests go to a SpilledDigests a shard at a time (the candidates forgotten
    as they go); lookups in any order read their shard back, the first and last too."""
    made = PackedCandidates(_Cand)
    wanted = [*digests(3000), bytes(32), b"\xff" * 32]
    for raw in wanted + wanted[:10]:  # a candidate twice: its digest once
        made.append(_Cand(raw, 1))
    into = packed.SpilledDigests(packed.ShardRecords(32, spill=spill, directory=tmp_path))
    made.digests_into(into)
    assert len(made) == 0 and os.listdir(tmp_path) == []
    others = digests(3000)
    for raw in [*wanted[::-1], *others]:  # descending, then shuffled shards
        assert (raw in into) == (raw in set(wanted))
    assert b"short" not in into and "text" not in into
    assert bytes(31) + b"\x01" not in into and b"\xff" * 31 + b"\xfe" not in into
    into.close()
    with pytest.raises(ValueError):
        packed.SpilledDigests(packed.ShardRecords(40))


@pytest.mark.parametrize("width", [32, 8])
def test_layer_links_of_doomed_blobs_with_whole_digests_or_prefixes(width: int) -> None:
    from daemon.inventory import Inventory

    doomed = sorted(digests(300))
    kept = digests(300)
    twin = doomed[5][:8] + bytes(24)  # a kept blob whose first 8 bytes are a doomed one's
    inventory = Inventory(keep_layers=True, layer_width=width)
    keys = [f"repositories/ns/a/_layers/sha256/{d.hex()}/link" for d in [*doomed[:10], *kept]]
    keys += [f"repositories/ns/b/_layers/sha256/{twin.hex()}/link"]
    keys += [f"repositories/c/_layers/sha256/{d.hex()}/link" for d in (doomed[0], doomed[-1])]
    inventory.add_keys(keys)
    found = set(inventory.layer_links(PackedShard(b"".join(doomed))))
    wanted = {("ns/a", d) for d in doomed[:10]} | {("c", doomed[0]), ("c", doomed[-1])}
    # a prefix that matches names the doomed digest's own link, which ns/b does not have:
    # removing it is a no-op, and ns/b's link of the kept twin is never named
    assert found - {("ns/b", doomed[5])} == wanted
    assert all(raw != twin for _name, raw in found)
    assert ("ns/b", doomed[5]) in found if width == 8 else ("ns/b", doomed[5]) not in found
    assert set(inventory.layer_links(set(doomed))) == found  # a plain set answers alike


def test_layer_links_wait_in_a_file_a_batch_reads_back_by_shard(tmp_path: Path) -> None:
    """Spilled layer links (a delete on the storage source): whole digests in an unlinked file
    of the given directory, found for a batch in shard order, first and last shard included,
    every repository's links by name, and nothing left once dropped."""
    from daemon.inventory import Inventory

    first, last = b"\x00" * 32, b"\xff" * 32
    doomed = sorted([first, last, *digests(200)])
    kept = digests(2000) + digests(300, first=0x42)  # shard 42's links fill a block or two
    records = packed.ShardRecords(36, spill=True, directory=tmp_path, prefix="layers-")
    inventory = Inventory(keep_layers=True, layer_width=32, layer_records=records)
    a = [*doomed[:50], *kept]
    keys = [f"repositories/ns/a/_layers/sha256/{d.hex()}/link" for d in a]
    keys += [f"repositories/b/_layers/sha256/{d.hex()}/link" for d in (first, last, doomed[7])]
    inventory.add_keys(keys)
    assert not os.listdir(tmp_path)  # unlinked at once: a crash leaves nothing behind
    assert os.fstat(records._file.fileno()).st_size > 0  # type: ignore[union-attr]  # spilled
    assert sorted(inventory.layer_digests("ns/a")) == sorted(a)
    assert sorted(inventory.layer_digests("b")) == sorted([first, last, doomed[7]])
    assert inventory.layer_digests("nobody") == []
    # a delete's batches, in shard order (each shard read once); kept blobs' links not named
    found = [
        link
        for start in range(0, len(doomed), 64)
        for link in inventory.layer_links(doomed[start : start + 64])
    ]
    wanted = [("ns/a", d) for d in doomed[:50]] + [("b", d) for d in (first, last, doomed[7])]
    assert sorted(found) == sorted(wanted) and len(found) == len(wanted)
    assert list(inventory.layer_links(sorted(digests(5)))) == []  # blobs no repository links
    inventory.drop_layers()
    assert records._file.closed and inventory.layer_records is None  # type: ignore[union-attr]
    assert list(inventory.layer_links(doomed)) == []


def test_blob_sizes_shards_first_last_and_repeats() -> None:
    """Sizes stay with their digests across shards, first and last of a shard, repeats once."""
    first = bytes([7]) + b"\x00" * 31
    last = bytes([7]) + b"\xff" * 31
    middle = bytes([7]) + b"\x80" * 31
    other = bytes([255]) * 32
    sizes = packed.BlobSizes()
    sizes.add_packed(middle + last + first)
    sizes.add_packed(first + other)
    sizes.seal()
    assert len(sizes) == 4
    assert sizes.shard(7) == first + middle + last
    assert sizes.shard(0) == b""
    assert sizes.get(first) == packed.MISSING and first not in sizes
    sizes.set(first, 0)
    sizes.set(last, 12)
    sizes.set(other, packed.UNSIZED)
    assert (sizes.get(first), sizes.get(middle), sizes.get(last)) == (0, packed.MISSING, 12)
    assert first in sizes and last in sizes and other in sizes and middle not in sizes
    assert sizes.get(bytes(32)) == packed.MISSING  # never added, in an empty shard
    assert dict(sizes.items())[other] == packed.UNSIZED
    with pytest.raises(KeyError):
        sizes.set(bytes([7]) + b"\x01" * 31, 1)


def test_packed_sizes_read_as_the_tuple() -> None:
    """PackedSizes reads back as the tuple it packs: None, 0, -1 and large sizes, slices."""
    sizes = (5, None, 0, -1, 2**62)
    held = packed.PackedSizes(sizes)
    assert tuple(held) == sizes and len(held) == 5
    assert (held[1], held[3], held[1:]) == (None, -1, sizes[1:])
    assert not packed.PackedSizes(())
    with pytest.raises(OverflowError):
        packed.PackedSizes((2**63,))


def test_digest_map_answers_like_a_dict_across_merges() -> None:
    """DigestMap: values stay with their digests through merges; first/last of a shard, an
    empty shard, one shard holding every digest, overwrites in the run and in the tail."""
    ours, theirs = packed.DigestMap(), {}
    crowded = digests(5000, first=0x00)  # one shard holds them all: many merges
    first, last = bytes(32), b"\x00" + b"\xff" * 31
    for value, raw in enumerate([last, *crowded, first]):
        ours[raw] = theirs[raw] = value
        if value % 997 == 0:  # lookups between merges: run and tail both asked
            assert all(ours.get(k) == v for k, v in theirs.items())
    assert len(ours) == len(theirs) == 5002
    assert (ours.get(first), ours.get(last)) == (5001, 0)
    for raw in crowded[::250]:  # overwrite: merged records and the unmerged tail alike
        ours[raw] = theirs[raw] = -7
    ours[first] = theirs[first] = -(2**63)
    assert len(ours) == 5002 and dict(ours.items()) == theirs
    assert [raw for raw, _v in ours.items()] == sorted(theirs)
    assert list(ours.shard_items(0x01)) == [] and b"\x01" * 32 not in ours
    assert ours.get(b"\x01" * 32, 9) == 9 and ours.get(b"short") is None
    assert first in ours and b"\x00" * 31 + b"\x01" not in ours
    spread = packed.DigestMap()
    others = digests(3000)
    for value, raw in enumerate(others):
        spread[raw] = value
    assert dict(spread.items()) == {raw: value for value, raw in enumerate(others)}
    with pytest.raises(ValueError):
        spread[b"x" * 31] = 1


@pytest.mark.parametrize("spill", [False, True])
def test_shard_records_give_back_each_shard_as_added(spill: bool, tmp_path: Path) -> None:
    """ShardRecords: a shard's records come back whole and in order across the file's
    blocks and the buffer, once; an empty shard, the first and last shard, odd widths."""
    held = packed.ShardRecords(40, spill=spill, directory=tmp_path)
    theirs: dict[int, bytes] = {}
    for i in range(600):  # shard 0 crosses many blocks; 255 one record
        shard = 0 if i % 3 else 7
        records = b"".join(bytes((shard,)) + RNG.randbytes(39) for _ in range(1 + i % 5))
        held.extend(shard, records)
        theirs[shard] = theirs.get(shard, b"") + records
    last = b"\xff" + RNG.randbytes(39)
    held.extend(255, last)
    assert os.listdir(tmp_path) == []  # unlinked at once: nothing left after a crash
    assert held.read(0) == theirs[0] and held.read(0) == theirs[0]  # read: they stay
    assert held.take(0) == theirs[0] and held.take(7) == theirs[7] and held.take(255) == last
    assert held.take(0) == b"" and held.take(1) == b""  # taken once; never added
    held.extend(0, b"\x00" * 40)  # added again after a take
    assert held.take(0) == b"\x00" * 40
    with pytest.raises(ValueError):
        held.extend(3, b"\x03" * 39)
    held.close()


def test_base_map_slots_over_the_base_and_values_elsewhere() -> None:
    """BaseMap: int32 values in slots aligned with the base's records, the rest (digests
    outside the base, values past int32) in a map; one sorted walk of a shard yields both."""
    inside = sorted(digests(500, first=0x10))
    base = [b""] * 256
    base[0x10] = b"".join(inside)
    base[0xFF] = bytes([0xFF]) * 32  # a shard whose only digest is its last possible one
    ours = packed.BaseMap(base)
    theirs: dict[bytes, int] = {}
    outside = digests(50, first=0x10) + digests(20, first=0x00)
    for i, raw in enumerate([*inside[::3], *outside, bytes([0xFF]) * 32]):
        value = -2 if i % 5 == 0 else 2**40 if i % 7 == 0 else i  # past int32 now and then
        ours[raw] = theirs[raw] = value
    ours[inside[3]] = theirs[inside[3]] = 2**35  # moved elsewhere: stays there
    ours[inside[3]] = theirs[inside[3]] = 4
    assert all(ours.get(k) == v for k, v in theirs.items())
    assert ours.get(inside[1]) is None and inside[1] not in ours and inside[0] in ours
    assert dict(ours.items()) == theirs and [k for k, _v in ours.items()] == sorted(theirs)
    walked = list(ours.shard_items(0x10))
    assert [raw for raw, _v, _b in walked] == sorted(k for k in theirs if k[0] == 0x10)
    assert all(in_base == (raw in set(inside)) for raw, _v, in_base in walked)
    assert list(ours.shard_items(0x42)) == []
    assert list(ours.shard_items(0xFF)) == [(bytes([0xFF]) * 32, theirs[bytes([0xFF]) * 32], True)]
    alone = packed.BaseMap()  # no base: a DigestMap
    alone[inside[0]] = 3
    assert alone.get(inside[0]) == 3 and list(alone.items()) == [(inside[0], 3)]
    with pytest.raises(ValueError):
        packed.BaseMap([b""] * 3)


def test_hex_set_raws_in_byte_order() -> None:
    values = digests(100)
    held = HexSet()
    for raw in values + values[:10]:
        held.add_raw(raw)
    assert held.raws() == sorted(values)
    assert HexSet().raws() == []


def test_spilled_digest_set_sorts_in_everything_once_asked(tmp_path: Path) -> None:
    """A spilled DigestSet: digests wait in a file in the given directory until the first
    lookup or settle; then each shard holds them sorted and once, like the in-memory set."""
    crowded = digests(3000, first=0x00)  # one shard holding most, many blocks of it
    first, last = bytes(32), b"\x00" + b"\xff" * 31
    spread = digests(2000)
    values = [*crowded, last, *spread, first, *crowded[:500]]  # repeats across flushes
    with pytest.raises(ValueError):  # its filter could not hold what waits in the file
        DigestSet(spill=Spill(tmp_path), lookups=True)
    spill = Spill(tmp_path)
    # in the directory asked for (the daemon's state dir), and unlinked from the start
    assert os.readlink(f"/proc/self/fd/{spill._file.fileno()}").startswith(str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    ours = DigestSet(spill=spill)
    for raw in values:
        ours.add(raw)
    ours.update_packed(b"".join(spread[:10]))
    assert ours.shard(0).data == sorted_unique(*(v for v in set(values) if v[0] == 0))
    assert ours._spill is not None  # a shard handed out leaves the others spilled
    ours.add(b"\x00" + b"\x01" * 31)  # after that shard was taken: merged in later
    steps = list(ours.settle_steps())
    assert steps == list(range(256)) and ours._spill is None
    expected = {*values, b"\x00" + b"\x01" * 31}
    assert len(ours) == len(expected) and set(ours) == expected
    assert first in ours and last in ours and b"\x00" * 31 + b"\x02" not in ours
    assert all(len(ours.shard(s)) == 0 for s in range(256) if not any(v[0] == s for v in expected))
    # a lookup before any settle sorts the spilled digests in first
    asked = DigestSet(spill=Spill(tmp_path))
    asked.update(spread)
    assert spread[0] in asked and asked._spill is None and len(asked) == len(set(spread))
    asked.add(first)  # added after: an ordinary in-memory digest
    assert first in asked and set(asked) == {*spread, first}
    assert len(DigestSet(spill=Spill(tmp_path))) == 0


def test_once_set_answers_each_digest_once_first_last_and_added_later() -> None:
    once = packed.OnceSet()
    assert not once and len(once) == 0 and not once.take(digests(1)[0])  # empty
    low, high = b"\x00" * 32, b"\xff" * 32  # first and last a digest can be
    members = [*digests(500, first=0x7F), low, high]
    for raw in reversed(members):  # any order, and repeats kept once
        once.add(raw)
    once.add(members[0])
    assert once and len(once) == 502
    outsiders = digests(50, first=0x7F)
    assert not any(once.take(raw) for raw in outsiders)
    assert once.take(low) and once.take(high) and not once.take(low)
    assert all(once.take(raw) for raw in sorted(members[:250]))  # ascending, as the mark asks
    assert len(once) == 250
    # added after takes: what was taken stays taken, the new one is answered once
    late = digests(1, first=0x7F)[0]
    once.add(late)
    once.add(members[0])  # taken already: adding it again does not answer it again
    assert not once.take(members[0]) and once.take(late) and not once.take(late)
    assert all(once.take(raw) for raw in members[250:500])
    assert not once and len(once) == 0
    with pytest.raises(ValueError):
        once.add(b"short")
