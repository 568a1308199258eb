"""Blocking reads, listings and parsing: what the filesystem driver runs in its threads and
reader processes, and how any driver applies a parser.

Imports nothing heavy (no asyncio): each reader process loads this module.
"""

from __future__ import annotations

import os
import re
import stat as statmod
import struct
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import TypeVar

from daemon import layout
from daemon.storage.model import BlobEntry, Entry, NotFound, StorageError, TooLarge

P = TypeVar("P")
R = TypeVar("R")
_HEX = re.compile(r"[0-9a-f]{64}").fullmatch
#: as daemon.usage.SIZED (that module is not imported here: readers load this one alone)
_SIZED = struct.Struct("<6sQ")


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """A reader process's initializer: the kernel kills it when its parent dies, SIGKILL
    included (Linux ``PR_SET_PDEATHSIG``); elsewhere a thread watches the parent instead."""
    import signal

    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        import threading
        import time

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)  # the parent died before the signal was asked for


def parse_each(
    datas: Sequence[bytes | None], parse: Callable[[bytes], P]
) -> list[P | ValueError | None]:
    """``parse`` of each content; None stays None, a ValueError raised takes the result's place."""
    out: list[P | ValueError | None] = []
    for data in datas:
        if data is None:
            out.append(None)
            continue
        try:
            out.append(parse(data))
        except ValueError as exc:
            out.append(exc)
    return out


def blob_names(path: str) -> tuple[list[str], set[str]]:
    """The blob directories of one shard directory (none if it does not exist), and those of
    them reached through a symbolic link (their own directory, the shard's or ``sha256/``):
    read through, as the registry does, and flagged, since nothing is deleted through one."""
    try:
        linked: set[str] = set()
        with os.scandir(path) as it:
            # the pattern inline, no helper call: this runs once per blob in the store
            names = [
                name
                for e in it
                if _HEX(name := e.name)
                and (e.is_dir(follow_symlinks=False) or _linked_dir(e, linked))
            ]
        if os.path.islink(path) or os.path.islink(os.path.dirname(path)):
            return names, set(names)
        return names, linked
    except FileNotFoundError:
        return [], set()
    except OSError as exc:
        raise StorageError(f"cannot list {path}: {exc.strerror}") from exc


def _linked_dir(entry: os.DirEntry[str], linked: set[str]) -> bool:
    if entry.is_symlink() and entry.is_dir():
        linked.add(entry.name)
        return True
    return False


def list_shard(path: str) -> list[BlobEntry]:
    """``blob_names`` as entries without size or mtime."""
    names, linked = blob_names(path)
    return [BlobEntry(name, linked=name in linked) for name in names]


def file_path(base: str, key: str) -> str:
    """Where ``key`` lives below ``base``; StorageError for a key that would climb out."""
    # keys come from the layout module; refuse anything that could climb out of the root
    # the split only when ".." is there at all: this runs once per file read
    if key.startswith("/") or (".." in key and ".." in key.split("/")):
        raise StorageError(f"refusing key outside the store: {key!r}")
    return f"{base}/{key}"


def read_file(base: str, key: str, limit: int) -> bytes:
    """A regular file's content, never following a symlink; NotFound, TooLarge, StorageError."""
    try:
        fd = os.open(file_path(base, key), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFound(f"{base}/{key} does not exist") from None
    except OSError as exc:
        raise StorageError(f"cannot open {base}/{key}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not statmod.S_ISREG(st.st_mode):
            raise StorageError(f"{base}/{key} is not a regular file")
        if st.st_size > limit:
            raise TooLarge(f"{base}/{key} is {st.st_size} bytes, over {limit}")
        # raw reads sized by fstat: a buffered read(limit + 1) allocated (and the kernel
        # zeroed) a 4 MiB buffer per manifest, most of the mark phase's time in profiles
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            want = min(limit + 1 - total, max(st.st_size + 1 - total, 4096))
            chunk = os.read(fd, want)
            chunks.append(chunk)
            total += len(chunk)
            if len(chunk) < want:
                break  # a short read of a regular file is its end
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except OSError as exc:
        raise StorageError(f"cannot read {base}/{key}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def read_files(base: str, keys: Sequence[str], limit: int) -> list[bytes | None]:
    """``read_file`` of each key, None where it does not exist."""
    out: list[bytes | None] = []
    for key in keys:
        try:
            out.append(read_file(base, key, limit))
        except NotFound:
            out.append(None)
    return out


def read_parsed(
    base: str, keys: Sequence[str], limit: int, parse: Callable[[bytes], P]
) -> list[P | ValueError | None]:
    """In a reader process: read each key and parse it there."""
    return parse_each(read_files(base, keys, limit), parse)


def as_is(results: list[P | ValueError | None]) -> list[P | ValueError | None]:
    """The fold that keeps every result (``read_parsed`` as a ``read_folded``)."""
    return results


def read_folded(
    base: str,
    keys: Sequence[str],
    limit: int,
    parse: Callable[[bytes], P],
    fold: Callable[[list[P | ValueError | None]], R],
) -> R:
    """In a reader process: ``read_parsed``, then ``fold`` of its results (one answer)."""
    return fold(read_parsed(base, keys, limit, parse))


def stat_file(base: str, key: str) -> Entry | None:
    """Size and mtime of ``key``, never following a symlink; None where it does not exist."""
    try:
        st = os.stat(file_path(base, key), follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot stat {base}/{key}: {exc.strerror}") from exc
    return Entry(key, st.st_size, st.st_mtime)


def _data_stat(blobs: str, name: str) -> os.stat_result | None:
    """``stat_file`` of blob ``name``'s data below the blobs directory ``blobs``, without
    its path checks: ``name`` matched the 64-hex pattern, nothing to climb out with."""
    path = f"{blobs}{name[:2]}/{name}/data"  # layout.blob_data, where the registry reads it
    try:
        return os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot stat {path}: {exc.strerror}") from exc


def _outside_entry(name: str, st: os.stat_result | None, linked: bool) -> BlobEntry:
    if st is None:
        return BlobEntry(name, linked=linked)
    return BlobEntry(name, st.st_size, st.st_mtime, linked)


def shard_outside(
    base: str, shard: str, members: AbstractSet[bytes]
) -> tuple[int, list[BlobEntry]]:
    """In a reader process: a blob shard's size, and its blobs not in ``members``, stat'ed."""
    names, linked = blob_names(file_path(base, layout.BLOBS + shard))
    names.sort()  # a shard's candidates in hex order
    # a plain set of the shard's members: lookups at C speed (a packed shard's own lookup is
    # Python code, once per blob: with the stat's path checks, a third of a sweep's time)
    inside = frozenset(members)
    blobs = f"{base}/{layout.BLOBS}"
    return len(names), [
        _outside_entry(name, _data_stat(blobs, name), name in linked)
        for name in names
        if bytes.fromhex(name) not in inside
    ]


def shard_sized(
    base: str, shard: str, members: AbstractSet[bytes]
) -> tuple[int, list[BlobEntry], bytes]:
    """``shard_outside``, and the in-use blobs' sizes as 14-byte records (digest bytes 1-6,
    size): every blob is stat'ed, and the sizes go back packed, not as entries."""
    names, linked = blob_names(file_path(base, layout.BLOBS + shard))
    names.sort()
    inside = frozenset(members)
    blobs = f"{base}/{layout.BLOBS}"
    outside: list[BlobEntry] = []
    sized = bytearray()
    pack = _SIZED.pack
    for name in names:
        raw = bytes.fromhex(name)
        st = _data_stat(blobs, name)
        if raw not in inside:
            outside.append(_outside_entry(name, st, name in linked))
        elif st is not None:
            sized += pack(raw[1:7], st.st_size)
    return len(names), outside, bytes(sized)
