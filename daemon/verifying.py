"""What verify reads in a manifest, where the driver parses (possibly a reader process).

Two readings of one content: the typed parse (daemon.manifests, the one the mark phase
trusts) and, independently, every digest-shaped string anywhere in the bytes. Imports
nothing heavy (no asyncio): reader processes load this module.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from daemon import layout, manifests
from daemon.packed import NO_SIZE
from daemon.storage.model import StorageError
from daemon.storage.reading import file_path

# any case (matched on the lowered bytes: IGNORECASE made this regex most of a manifest's
# reading time), anywhere: keys, values, strings inside strings; a longer hex run is no digest
# (no look-behind: it cost four times the rest; "xsha256:<hex>" is read as a digest too,
# which only ever adds a string to check)
_DIGESTS = re.compile(rb"sha(?:256:[0-9a-f]{64}|512:[0-9a-f]{128})(?![0-9a-f])")
_TEXT_DIGESTS = re.compile(_DIGESTS.pattern.decode())
#: subtrees whose digests describe, and never require, content: a base image's digest in an
#: annotation, a parent image id in schema1's history
NOTES = frozenset({"annotations", "history", "labels"})

TypedParse = Callable[[bytes], manifests.References]


class Facts(NamedTuple):
    """One manifest as verify needs it (a tuple: it crosses between processes, and a
    dataclass's state took four times as long to pickle and unpickle)."""

    length: int
    kind: str = ""
    blobs: bytes = b""  # raw 32-byte digests the typed parse found: config, layers, blobs
    children: bytes = b""  # child manifests of a list/index
    subjects: bytes = b""  # the OCI 1.1 subject a referrer is about
    #: the size a descriptor gives for each of ``blobs`` then ``children``, in their order
    #: (None where no descriptor names it); the first descriptor naming a digest wins
    sizes: Sequence[int | None] = ()  # verify holds them packed (daemon.packed.PackedSizes)
    foreign: tuple[str, ...] = ()  # non-sha256 digests the typed parse named
    loose: tuple[str, ...] = ()  # digest strings the typed parse did not explain
    noted: int = 0  # digest strings only in annotations/history: counted, not checked
    error: str = ""  # why the typed parse refused it

    def size_of(self, raw: bytes) -> int | None:
        packed = self.blobs + self.children
        for index, start in enumerate(range(0, len(packed), 32)):
            if packed[start : start + 32] == raw:
                return self.sizes[index]
        return None


def _sizes(doc: dict[str, Any]) -> dict[str, int]:
    """Descriptor sizes one level down, whatever the key is called: digest -> first size."""
    out: dict[str, int] = {}
    for value in doc.values():
        if isinstance(value, list):
            items = value
        elif isinstance(value, dict):
            items = [value]
        else:
            continue
        for item in items:
            if not isinstance(item, dict):
                continue
            digest, size = item.get("digest"), item.get("size")
            # type() is int: a JSON true is no size
            if isinstance(digest, str) and type(size) is int and digest not in out:
                out[digest] = size
    return out


def _subjects(doc: dict[str, Any]) -> bytes:
    raws = []
    for key, value in doc.items():
        text = value.get("digest") if isinstance(value, dict) else None
        if key.lower() == "subject" and isinstance(text, str):
            with contextlib.suppress(layout.InvalidDigest):
                raws.append(layout.parse_digest(text))
    return b"".join(raws)


def _strings(value: Any, noted: bool) -> Iterator[tuple[str, bool]]:
    """Every string (keys too) with whether it sits below an annotations-like key."""
    if isinstance(value, str):
        yield value, noted
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, noted)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key, noted
            yield from _strings(item, noted or key.lower() in NOTES)


def read_facts(typed: TypedParse, data: bytes) -> Facts:
    """Both readings of one manifest; never raises on bad content (that is a finding)."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        doc = None
    refs: manifests.References | None = None
    error = ""
    try:
        # the typed parse reads the bytes itself (a test blinds it); the JSON just loaded
        # is only lent to the module's own parse, which would load the same document again
        refs = manifests.parse_loaded(doc, data) if typed is manifests.parse else typed(data)
    except (manifests.ManifestError, ValueError) as exc:
        error = str(exc) or type(exc).__name__
    blobs = b"".join(refs.blobs) if refs else b""
    children = b"".join(refs.children) if refs else b""
    named = (refs.foreign_blobs + refs.foreign_children) if refs else []
    foreign = tuple(f.lower() for f in named)
    subjects = _subjects(doc) if isinstance(doc, dict) else b""
    hexes = (blobs + children + subjects).hex()
    explained = {"sha256:" + hexes[i : i + 64] for i in range(0, len(hexes), 64)}
    explained.update(foreign)
    if refs is not None and refs.subject and not refs.subject.startswith("sha256:"):
        explained.add(refs.subject.lower())  # a sha384/sha512 subject the parser read
    hits = {m.decode("ascii") for m in _DIGESTS.findall(data.lower())} - explained
    loose: set[str] = set()
    noted = 0
    if hits:
        if isinstance(doc, (dict, list)):
            # the rare slow path: which of them sit outside annotations and history
            outside: set[str] = set()
            for text, is_note in _strings(doc, False):
                if not is_note:
                    outside.update(_TEXT_DIGESTS.findall(text.lower()))
            loose = hits & outside
            noted = len(hits - outside)
        else:
            loose = hits
    sizes: Sequence[int | None] = ()  # verify holds them packed (daemon.packed.PackedSizes)
    if isinstance(doc, dict) and (blobs or children):
        given = _sizes(doc)
        ends = 2 * (len(blobs) + len(children))  # hex digits of blobs then children
        sizes = tuple(given.get("sha256:" + hexes[i : i + 64]) for i in range(0, ends, 64))
    elif blobs or children:
        sizes = (None,) * ((len(blobs) + len(children)) // 32)
    return Facts(
        length=len(data),
        kind=refs.kind if refs else "",
        blobs=blobs,
        children=children,
        subjects=subjects,
        sizes=sizes,
        foreign=foreign,
        loose=tuple(sorted(loose)),
        noted=noted,
        error=error,
    )


def blob_sizes(base: str, hexes: list[str]) -> list[int | None]:
    """In a reader process: the data size of each blob, None where it has no data."""
    # one stat per referenced blob is most of verify's extra work on a disk: no Entry, key
    # or path check per blob (the names are hex digests: nothing to climb out with)
    blobs = file_path(base, layout.BLOBS)
    out: list[int | None] = []
    stat = os.stat
    for hexdigest in hexes:
        path = f"{blobs}{hexdigest[:2]}/{hexdigest}/data"
        try:
            out.append(stat(path, follow_symlinks=False).st_size)
        except FileNotFoundError:
            out.append(None)
        except OSError as exc:
            raise StorageError(f"cannot stat {path}: {exc.strerror}") from exc
    return out


#: a blob verify checks: its 32-byte digest and the size a descriptor wants (int64, little
#: endian; ``NO_SIZE`` where none is given), compared where the blob is stat'ed
SIZE_WANT = struct.Struct("<32sq")
_WANTS = re.compile(rb".{%d}" % SIZE_WANT.size, re.DOTALL)  # records, split in C


def is_plain(facts: Facts) -> bool:
    """Blobs and sizes only: judged from its blobs' records alone, unless a blob is bad."""
    return not (
        facts.children
        or facts.subjects
        or facts.foreign
        or facts.loose
        or facts.noted
        or facts.error
    )


class Chunk(NamedTuple):
    """A chunk of manifests as the reader that parsed them hands it over: per manifest its
    ``Facts``, or for a plain image only its length (None: no data, or unreadable); and the
    ``SIZE_WANT`` records of every blob they reference, by blob shard, so that the main
    process touches no single blob (issue 24's speed, issue 19's memory)."""

    facts: list[Facts | int | None]
    wants: list[tuple[int, bytes]]  # (shard, its records, sorted, each once)


_INT64 = 2**63


def fold_facts(found: Sequence[Facts | ValueError | None]) -> Chunk:
    """In a reader process: a chunk's ``read_facts`` results, folded into a ``Chunk``."""
    out: list[Facts | int | None] = []
    records: set[bytes] = set()
    pack = SIZE_WANT.pack
    for facts in found:
        if not isinstance(facts, Facts):
            out.append(None)  # read_facts never raises: a ValueError came from the driver
            continue
        blobs, sizes = facts.blobs, facts.sizes
        for index, start in enumerate(range(0, len(blobs), 32)):
            size = sizes[index] if index < len(sizes) else None
            # a size no int64 holds, or below 0, is sent as -1 (no blob has it): the blob's
            # size comes back, and the judging compares it with each descriptor
            want = NO_SIZE if size is None else size if 0 <= size < _INT64 else -1
            records.add(pack(blobs[start : start + 32], want))
        out.append(facts.length if is_plain(facts) else facts)
    ordered = sorted(records)
    wants: list[tuple[int, bytes]] = []
    at = 0
    while at < len(ordered):
        shard = ordered[at][0]
        # records of later shards all sort at or after the next byte
        end = bisect.bisect_left(ordered, bytes([shard + 1]), at) if shard < 255 else len(ordered)
        wants.append((shard, b"".join(ordered[at:end])))
        at = end
    return Chunk(out, wants)


def size_mismatches(
    wants: bytes, size_of: Callable[[bytes], int | None]
) -> list[tuple[bytes, int | None]]:
    """Of ``SIZE_WANT`` records: each digest with no data (None), or with a size some record
    does not want (that size). ``size_of`` is asked once a digest, in digest order."""
    out: list[tuple[bytes, int | None]] = []
    last = b""
    size: int | None = None
    told = False
    unpack = SIZE_WANT.unpack
    for record in sorted(set(_WANTS.findall(wants))):
        raw, want = unpack(record)
        if raw != last:
            last, told = raw, False
            size = size_of(raw)
            if size is None:
                out.append((raw, None))
                told = True
        if not told and want != NO_SIZE and want != size:
            out.append((raw, size))
            told = True
    return out


def blob_mismatches(base: str, wants: bytes) -> list[tuple[bytes, int | None]]:
    """In a reader process: ``size_mismatches`` of one shard's records, a stat a blob."""
    if not wants:
        return []
    shard = file_path(base, f"{layout.BLOBS}{wants[0]:02x}")
    stat = os.stat
    try:
        # stats relative to the shard's directory: a shorter walk than from the root (a
        # quarter of a stat's time here), links followed as the full path follows them
        fd = os.open(shard, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return size_mismatches(wants, lambda _raw: None)  # no blob of this shard has data
    except OSError as exc:
        raise StorageError(f"cannot open {shard}: {exc.strerror}") from exc

    def size_of(raw: bytes) -> int | None:
        name = f"{raw.hex()}/data"
        try:
            return stat(name, dir_fd=fd, follow_symlinks=False).st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot stat {shard}/{name}: {exc.strerror}") from exc

    try:
        return size_mismatches(wants, size_of)
    finally:
        os.close(fd)
