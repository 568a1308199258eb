"""Filesystem driver: scandir in a bounded pool of threads, manifest reads and shard sweeps in
reader processes (one per core, at most 4).

Symbolic links to directories (a namespace moved to another volume and linked back) are
followed to read references, as the registry follows them, and each one is reported; nothing
is ever deleted through one."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import multiprocessing
import os
import shutil
import stat as statmod
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

from daemon import layout, verifying
from daemon.atomic import atomic_write
from daemon.cpus import usable_cpus
from daemon.packed import PackedShard
from daemon.storage import reading
from daemon.storage.base import (
    BlobEntry,
    Conflict,
    DeleteFailure,
    Entry,
    Storage,
    StorageError,
)

T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")
_BATCH = 256
_PROCESS_IDLE = 10.0  # seconds before idle reader processes are stopped
_MAX_READERS = 4
_SECTIONS = frozenset(("_manifests", "_layers", "_uploads"))


class FilesystemStorage(Storage):
    """A registry store on a local or mounted filesystem."""

    def __init__(self, rootdirectory: str, concurrency: int = 8) -> None:
        self.rootdirectory = Path(rootdirectory)
        self.base = self.rootdirectory / layout.V2_ROOT
        self._base = str(self.base)
        # threads beyond a couple per core only fight over the GIL and stall the event loop
        # (status requests) when the page cache answers; slow network mounts want more
        cpus = usable_cpus()
        self.concurrency = max(1, min(concurrency, 2 * cpus))
        self.description = f"filesystem:{self.rootdirectory}"
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="fs")
        self._processes: ProcessPoolExecutor | None = None
        # past one reader per core, a warm page cache gains nothing and memory grows
        # (one reader: 8.0 s for a 500k check where two took 6.6), and each reader is ~18 MB
        self._reader_count = min(self.concurrency, cpus, _MAX_READERS)
        self._in_flight = 0  # calls in the reader processes
        self._runs = 0  # runs between warm_up and cool_down: their readers are kept
        self._idle: asyncio.TimerHandle | None = None
        # what the current scan followed: symbolic links, told to the run (take_notes)
        self._notes: list[str] = []
        self._followed: set[tuple[int, int]] = set()  # (st_dev, st_ino) of link targets
        self._followed_lock = threading.Lock()
        #: where the links a scan followed point (real paths): never deleted either, so that
        #: a link's target in the store does not go under its own name
        self._targets: set[str] = set()
        self._real_base = os.path.realpath(self._base)

    def take_notes(self) -> list[str]:
        notes, self._notes = self._notes, []
        return notes

    def location(self, key: str) -> str:
        # plain string joins: pathlib showed in the sweep's profile, once per candidate
        return f"{self._base}/{key}"

    def _path(self, key: str) -> str:
        return reading.file_path(self._base, key)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def probe(self) -> None:
        root = self.rootdirectory
        if not root.is_dir():
            raise StorageError(
                f"storage root {root} does not exist or is not a directory "
                "(check storage.filesystem.rootdirectory in the registry config)"
            )
        if not any(root.iterdir()):
            return  # a registry that never stored anything: an empty store, nothing to prune
        if not (self.base / "blobs").is_dir() and not (self.base / "repositories").is_dir():
            raise StorageError(
                f"{root} is not a registry store: {self.base} has no blobs/ or repositories/ "
                "(wrong rootdirectory, or nothing was ever pushed)"
            )
        if not os.access(self.base, os.R_OK | os.X_OK):
            raise StorageError(f"{self.base} is not readable by this process")

    async def list_blob_shard(self, shard: str) -> list[BlobEntry]:
        return await self._run(reading.list_shard, self._path(layout.BLOBS + shard))

    async def stat(self, key: str) -> Entry | None:
        return await self._run(reading.stat_file, self._base, key)

    async def walk(self, prefix: str) -> AsyncIterator[list[Entry]]:
        files, dirs = await self.list_dir(prefix)
        if files:
            yield [Entry(prefix + name) for name in files]
        # one thread per top-level subtree keeps the pool busy without a task per directory
        sem = asyncio.Semaphore(self.concurrency)

        async def subtree(name: str) -> list[Entry]:
            async with sem:
                return await self._run(self._walk_tree, prefix + name + "/")

        tasks = [asyncio.ensure_future(subtree(name)) for name in dirs]
        try:
            for done in asyncio.as_completed(tasks):
                entries = await done
                for i in range(0, len(entries), _BATCH * 16):
                    yield entries[i : i + _BATCH * 16]
        finally:
            for task in tasks:
                task.cancel()

    def _walk_tree(self, prefix: str) -> list[Entry]:
        out: list[Entry] = []
        stack = [prefix]
        while stack:
            current = stack.pop()
            try:
                with os.scandir(self._path(current)) as it:
                    for e in it:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(current + e.name + "/")
                        elif e.is_file(follow_symlinks=False):
                            out.append(Entry(current + e.name))
            except FileNotFoundError:
                continue  # removed while we walked (an upload finishing)
            except OSError as exc:
                raise StorageError(f"cannot list {self.location(current)}: {exc.strerror}") from exc
        return out

    async def scan_repositories(self, layers: bool = True) -> AsyncIterator[list[str]]:
        self._notes = []
        self._followed = set()
        self._targets = set()
        dirs = await self._run(self._subdirs, layout.REPOSITORIES)
        # Two kinds of thread jobs share a sliding window: "find" walks the directories above
        # repositories, "scan" lists one repository's sections. A batch is one repository's
        # keys, not a whole namespace's (several namespaces in flight were the check's peak
        # memory at a million blobs), and the window bounds how many batches wait.
        loop = asyncio.get_running_loop()
        queue: deque[tuple[str, str, frozenset[str]]] = deque(
            ("find", f"{layout.REPOSITORIES}{name}/", frozenset()) for name in dirs
        )
        window = 4 * self.concurrency
        kinds: dict[asyncio.Future[list[Any]], str] = {}
        try:
            while queue or kinds:
                while queue and len(kinds) < window:
                    kind, prefix, sections = queue.popleft()
                    if kind == "find":
                        job = loop.run_in_executor(self._pool, self._find_repositories, prefix)
                    else:
                        job = loop.run_in_executor(
                            self._pool, self._scan_repo, prefix, sections, layers
                        )
                    kinds[job] = kind
                done, _ = await asyncio.wait(kinds, return_when=asyncio.FIRST_COMPLETED)
                for job in done:
                    if kinds.pop(job) == "find":
                        # scans first: what is found waits as a short tuple, not as keys
                        queue.extendleft(("scan", p, secs) for p, secs in job.result())
                    else:
                        yield job.result()
        finally:
            for job in kinds:
                job.cancel()

    def _find_repositories(self, prefix: str) -> list[tuple[str, frozenset[str]]]:
        """Repositories at or below ``prefix``, each with the sections it has."""
        found: list[tuple[str, frozenset[str]]] = []
        if not self._enter(prefix):
            return found
        stack = [prefix]
        while stack:
            current = stack.pop()
            names = self._subdirs(current)
            sections = _SECTIONS.intersection(names)
            if sections:
                found.append((current, frozenset(sections)))
            # a repository may hold others below it (a/b and a/b/c are both repositories)
            stack += [
                f"{current}{name}/"
                for name in names
                if name not in _SECTIONS and self._enter(f"{current}{name}/")
            ]
        return found

    def _subdirs(self, prefix: str) -> list[str]:
        """The directories in ``prefix``, symbolic links to directories included."""
        try:
            with os.scandir(self._path(prefix)) as it:
                # is_dir() follows a link, and costs no stat for a plain directory
                return [e.name for e in it if e.is_dir()]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list {self.location(prefix)}: {exc.strerror}") from exc

    def _enter(self, prefix: str) -> bool:
        """Whether to walk ``prefix``: a plain directory, or a symbolic link whose target this
        scan has not walked yet (a loop, or two links to one place, is walked once)."""
        path = self._path(prefix.rstrip("/"))
        if not os.path.islink(path):
            return True
        try:
            st = os.stat(path)
            target = os.path.realpath(path)
        except OSError as exc:
            raise StorageError(f"cannot follow {path}: {exc.strerror}") from exc
        with self._followed_lock:
            first = (st.st_dev, st.st_ino) not in self._followed
            self._followed.add((st.st_dev, st.st_ino))
            self._targets.add(target)
        if first:
            self._notes.append(
                f"{path} is a symbolic link to {target}: read to keep what it references, "
                "never deleted through"
            )
        else:
            self._notes.append(
                f"{path} is a symbolic link to {target}, which this scan already read "
                "(a loop, or a second link to it): not read again"
            )
        return first

    def _scan_repo(self, current: str, sections: frozenset[str], layers: bool) -> list[str]:
        # one directory listing per section instead of one per link: the links' own
        # directories are only named here; readers handle a link that is not there
        out: list[str] = []
        if "_manifests" in sections:
            out += self._keys(f"{current}_manifests/revisions/sha256/", "/link")
            out += self._keys(f"{current}_manifests/tags/", "/current/link")
        if "_layers" in sections:
            if layers:
                out += self._keys(f"{current}_layers/sha256/", "/link")
                for algo in layout.FOREIGN_ALGORITHMS:
                    out += self._keys(f"{current}_layers/{algo}/", "/link")
            else:
                out.append(f"{current}_layers/")
        if "_uploads" in sections:
            out += self._keys(f"{current}_uploads/", "/startedat")
        return out

    def _keys(self, prefix: str, suffix: str) -> list[str]:
        """``prefix + name + suffix`` for each directory in ``prefix``, in one pass."""
        try:
            with os.scandir(self._path(prefix)) as it:
                # a plain directory costs no stat; a link to one (a revision's directory moved
                # elsewhere) is read too, and reported
                return [
                    f"{prefix}{e.name}{suffix}"
                    for e in it
                    if e.is_dir(follow_symlinks=False) or self._linked_dir(e)
                ]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list {self.location(prefix)}: {exc.strerror}") from exc

    def _linked_dir(self, entry: os.DirEntry[str]) -> bool:
        """True for a symbolic link to a directory, noted (where it points is never deleted)."""
        if not (entry.is_symlink() and entry.is_dir()):
            return False
        target = os.path.realpath(entry.path)
        self._targets.add(target)
        self._notes.append(
            f"{entry.path} is a symbolic link to {target}: read, never deleted through"
        )
        return True

    async def read_many(self, keys: Sequence[str], limit: int) -> list[bytes | None]:
        return await self._run(reading.read_files, self._base, keys, limit)

    async def read_folded(
        self,
        keys: Sequence[str],
        limit: int,
        parse: Callable[[bytes], P],
        fold: Callable[[list[P | ValueError | None]], R],
    ) -> R:
        return await self._in_process(
            reading.read_folded, self._base, list(keys), limit, parse, fold
        )

    async def blobs_outside(
        self, shard: str, members: AbstractSet[bytes]
    ) -> tuple[int, list[BlobEntry]]:
        # the listing, the digests and the stats stay in the reader process: only the
        # blobs outside come back (most of a sweep's time, on the loop's thread, before)
        return await self._in_process(reading.shard_outside, self._base, shard, _portable(members))

    async def blob_sizes(self, shard: str, wanted: AbstractSet[bytes]) -> dict[bytes, int]:
        # a stat per wanted blob, in a reader process: no shard listing needed on a disk
        hexes = sorted(raw.hex() for raw in wanted)
        sizes = await self._in_process(verifying.blob_sizes, self._base, hexes)
        return {
            bytes.fromhex(h): size for h, size in zip(hexes, sizes, strict=True) if size is not None
        }

    async def blob_mismatches(self, shard: str, wants: bytes) -> list[tuple[bytes, int | None]]:
        # the stats and the size comparisons in a reader process: only the exceptions come
        # back (none in a whole store), not a size a blob for the event loop to look up
        return await self._in_process(verifying.blob_mismatches, self._base, wants)

    async def blobs_outside_sized(
        self, shard: str, members: AbstractSet[bytes]
    ) -> tuple[int, list[BlobEntry], bytes]:
        # the in-use blobs' stats stay in the reader too: only packed sizes come back
        return await self._in_process(reading.shard_sized, self._base, shard, _portable(members))

    def warm_up(self) -> None:
        # the reader processes take a few hundred ms to start: they do it during the scan
        self._runs += 1
        for _attempt in range(2):
            pool = self._readers()
            try:
                for _ in range(self._reader_count):
                    pool.submit(int)  # a no-op: each submit with no idle reader starts one
                break
            except BrokenProcessPool:
                # a reader died between runs (nothing of a run was lost): start afresh
                self._processes = None
                pool.shutdown(wait=False)
        self._idle_soon(asyncio.get_running_loop())

    def cool_down(self) -> None:
        # kept through a run's quiet phases (a delete's unlinks, 20 s and more at 1M blobs):
        # readers started again later would be spawned (threads exist by then), each a new
        # interpreter, with a resource tracker besides: 13 MB more at the run's peak, and the
        # parent's whole size counted twice for the instant of each fork (issue 19)
        self._runs = max(0, self._runs - 1)
        self._idle_soon(asyncio.get_running_loop())

    def _readers(self) -> ProcessPoolExecutor:
        # reading and parsing in worker processes: threads share one core through the GIL
        # (the check was bound by it, and more threads only added contention); processes
        # use every core on a warm page cache and overlap the reads on a cold one
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._processes is None:
            self._processes = ProcessPoolExecutor(
                self._reader_count,
                mp_context=_reader_context(),
                # a reader outlived a SIGKILLed one-shot run by minutes: it goes with us
                initializer=reading.die_with_parent,
                initargs=(os.getpid(),),
            )
        return self._processes

    async def _in_process(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        pool = self._readers()
        self._in_flight += 1
        try:
            return await loop.run_in_executor(pool, fn, *args)
        except BrokenProcessPool as exc:
            if self._processes is pool:
                self._processes = None
            raise StorageError(
                f"a reader process ended unexpectedly ({exc}); out of memory? run again"
            ) from exc
        finally:
            self._in_flight -= 1
            self._idle_soon(loop)

    def _idle_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        busy = self._in_flight or self._runs
        if not busy and self._processes is not None and self._idle is None:
            # a daemon between runs holds no idle processes
            self._idle = loop.call_later(_PROCESS_IDLE, self._stop_processes)

    def _stop_processes(self) -> None:
        self._idle = None
        if self._processes is not None and not (self._in_flight or self._runs):
            self._processes.shutdown(wait=False, cancel_futures=True)
            self._processes = None

    async def stat_many(self, keys: Sequence[str]) -> list[Entry | None]:
        return await self._run(lambda: [reading.stat_file(self._base, key) for key in keys])

    async def list_dir(self, prefix: str) -> tuple[list[str], list[str]]:
        return await self._run(self._list_dir, prefix)

    def _list_dir(self, prefix: str) -> tuple[list[str], list[str]]:
        files: list[str] = []
        dirs: list[str] = []
        try:
            with os.scandir(self._path(prefix)) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        dirs.append(e.name)
                    elif e.is_file(follow_symlinks=False):
                        files.append(e.name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot list {self.location(prefix)}: {exc.strerror}") from exc
        return files, dirs

    async def read(self, key: str, limit: int) -> bytes:
        return await self._run(reading.read_file, self._base, key, limit)

    async def write(self, key: str, data: bytes) -> None:
        await self._run(self._write, key, data)

    def _write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, data)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror}") from exc

    async def conditional_writes(self) -> bool:
        # flock: honoured by local filesystems, NFSv4 (as POSIX locks) and CephFS
        return True

    async def read_versioned(self, key: str, limit: int) -> tuple[bytes, str]:
        data = await self.read(key, limit)
        return data, _version(data)

    async def write_if(self, key: str, data: bytes, version: str | None) -> str:
        return await self._run(self._write_if, key, data, version)

    def _write_if(self, key: str, data: bytes, version: str | None) -> str:
        path = self._path(key)
        try:
            fd = _locked(path)
        except OSError as exc:
            raise StorageError(f"cannot lock {path}: {exc.strerror}") from exc
        try:
            try:
                with open(path, "rb") as fh:
                    current: str | None = _version(fh.read())
            except FileNotFoundError:
                current = None
            if current != version:
                found = "absent" if current is None else "changed"
                raise Conflict(f"{path} is {found}: not written")
            atomic_write(path, data)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        return _version(data)

    async def delete_blobs(self, hexes: Sequence[str]) -> list[DeleteFailure]:
        failures = await self.delete_trees([layout.blob_dir(h) for h in hexes])
        return [
            DeleteFailure(f.key.rstrip("/").rsplit("/", 1)[-1], f.reason, f.kept) for f in failures
        ]

    async def move(self, src: str, dst: str) -> bool:
        return await self._run(self._move, src, dst)

    def _move(self, src: str, dst: str) -> bool:
        target = self._path(dst)
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(self._path(src), target)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot move {self.location(src)}: {exc.strerror}") from exc
        return True

    async def move_keys(
        self, moves: Sequence[tuple[str, str, int | None]]
    ) -> tuple[list[str], list[DeleteFailure]]:
        """Renames, in chunks on the thread pool; never through a symbolic link."""
        chunks = [moves[i : i + _BATCH] for i in range(0, len(moves), _BATCH)]
        moved: list[str] = []
        failures: list[DeleteFailure] = []
        results = await asyncio.gather(*(self._run(self._rename_many, c) for c in chunks))
        for done, failed in results:
            moved += done
            failures += failed
        return moved, failures

    def _rename_many(
        self, moves: Sequence[tuple[str, str, int | None]]
    ) -> tuple[list[str], list[DeleteFailure]]:
        moved: list[str] = []
        failures: list[DeleteFailure] = []
        plain: set[str] = set()
        for src, dst, _size in moves:
            # a move through a link would take what it points to (another volume's data)
            link = self._link_on_path(src, plain)
            if link:
                failures.append(DeleteFailure(src, _through(link), kept=True))
                continue
            try:
                if self._move(src, dst):
                    moved.append(src)
            except StorageError as exc:
                failures.append(DeleteFailure(src, str(exc)))
        return moved, failures

    async def remove_empty_dirs(self, prefixes: Sequence[str]) -> None:
        await self._run(self._rmdirs, prefixes)

    def _rmdirs(self, prefixes: Sequence[str]) -> None:
        for prefix in prefixes:
            # rmdir refuses a directory that is not empty: a blob uploaded again stays
            with contextlib.suppress(OSError):
                os.rmdir(self._path(prefix.rstrip("/")))

    async def delete_keys(self, keys: Sequence[str]) -> list[DeleteFailure]:
        return await self._chunked(self._unlink_many, keys)

    async def delete_tree(self, prefix: str) -> list[DeleteFailure]:
        return await self.delete_trees([prefix])

    async def delete_trees(self, prefixes: Sequence[str]) -> list[DeleteFailure]:
        return await self._chunked(self._rmtree_many, prefixes)

    async def _chunked(
        self, fn: Callable[[Sequence[str]], list[DeleteFailure]], items: Sequence[str]
    ) -> list[DeleteFailure]:
        chunks = [items[i : i + _BATCH] for i in range(0, len(items), _BATCH)]
        results = await asyncio.gather(*(self._run(fn, chunk) for chunk in chunks))
        return [failure for result in results for failure in result]

    def _unlink_many(self, keys: Sequence[str]) -> list[DeleteFailure]:
        failures = []
        plain: set[str] = set()
        for key in keys:
            try:
                link = self._link_on_path(key, plain)
                if link:
                    failures.append(DeleteFailure(key, _through(link), kept=True))
                    continue
                _unlink_with_lock(self._path(key))
            except FileNotFoundError:
                pass
            except (OSError, StorageError) as exc:
                failures.append(DeleteFailure(key, str(exc)))
        return failures

    def _rmtree_many(self, prefixes: Sequence[str]) -> list[DeleteFailure]:
        failures = []
        plain: set[str] = set()
        for prefix in prefixes:
            try:
                if not prefix.strip("/"):
                    raise StorageError("refusing to delete the whole store")
                link = self._link_on_path(prefix, plain)
                if link:
                    failures.append(DeleteFailure(prefix, _through(link), kept=True))
                    continue
                shutil.rmtree(self._path(prefix.rstrip("/")))
            except FileNotFoundError:
                pass
            except (OSError, StorageError) as exc:
                failures.append(DeleteFailure(prefix, str(exc)))
        return failures

    def _link_on_path(self, key: str, plain: set[str]) -> str:
        """The first symbolic link on ``key``'s path below the store's top directories
        (blobs/, repositories/, ...: those may be links, a store moved whole), or "".

        A delete reached through a link would remove what it points to (another volume's
        namespace, another store's blob), which the run cannot judge. ``plain`` caches the
        directories found not to be links, for one batch."""
        parts = key.rstrip("/").split("/")
        path = f"{self._base}/{parts[0]}"
        for part in parts[1:]:
            path = f"{path}/{part}"
            if path in plain:
                continue
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                return ""  # nothing below to delete
            if statmod.S_ISLNK(mode):
                return path
            if statmod.S_ISDIR(mode):
                plain.add(path)
        if self._targets:
            # no link on the way: the real path is the store's own plus the key
            real = f"{self._real_base}/{key.rstrip('/')}"
            for target in self._targets:
                if real == target or target.startswith(real + "/") or real.startswith(target + "/"):
                    return target
        return ""

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        pool, self._processes = self._processes, None
        if pool is not None:
            # waited for: an interpreter exiting under a pool still shutting down complains
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)


def _through(link: str) -> str:
    if not os.path.islink(link):
        return (
            f"a symbolic link in the store points to {link}, which is read through it: "
            "never deleted; remove it by hand (and the link) if it is no longer needed"
        )
    return (
        f"reached through the symbolic link {link} (to {os.path.realpath(link)}): "
        "never deleted through a link; remove it by hand if it is no longer needed"
    )


def _version(data: bytes) -> str:
    """A file's version for write_if: its content's digest (a lease's content is unique)."""
    return hashlib.sha256(data).hexdigest()


def _lock_path(path: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.lock")


def _locked(path: str) -> int:
    """An fd holding the exclusive lock every conditional writer of ``path`` takes.

    The lock goes with the process, so a writer that dies leaves nothing to clean up. The
    lock file may be unlinked by whoever deletes ``path``: a lock taken on an inode no longer
    at the lock path is no lock, so take it again on the file that is there."""
    lock = _lock_path(path)
    while True:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _unlink_with_lock(path: str) -> None:
    """Unlink ``path`` and, where conditional writes locked it, its lock file (under the lock,
    so that nothing of ours is left behind and no writer holds a lock on a stale file)."""
    if not os.path.exists(_lock_path(path)):
        os.unlink(path)
        return
    fd = _locked(path)
    try:
        os.unlink(path)
        os.unlink(_lock_path(path))
    finally:
        os.close(fd)


def _reader_context() -> multiprocessing.context.BaseContext:
    """Fork while this process has one thread, else spawn. A one-shot run starts its readers
    first thing (``warm_up`` before its first thread): a fork costs a reader ~0.01 CPU s where
    a spawned one starts an interpreter and imports its modules again (~0.08 s each, with a
    resource tracker besides: ~0.2 s and as much wall time of a CLI check). Once there are
    threads (the pool above, asyncio's, a serving daemon's), a lock another thread held at the
    fork would stay held in the child: spawn."""
    if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
        # what is buffered now would be written again by each child as it exits
        sys.stdout.flush()
        sys.stderr.flush()
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _portable(members: AbstractSet[bytes]) -> AbstractSet[bytes]:
    """``members`` as sent to a reader: a packed shard as it is (its buffer, 32 bytes a
    digest), any other set as a frozenset."""
    return members if isinstance(members, PackedShard) else frozenset(members)
