"""What every object-store driver shares: sharded listings, batched deletes, bounded retries,
failure naming and the key <-> relative key mapping. A driver adds only its service's calls."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import random
import re
import sys
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar
from urllib.parse import unquote

import structlog

from daemon import layout, logs
from daemon.config import StorageSettings
from daemon.packed import OnceSet
from daemon.storage.base import (
    RUN_LOG,
    BlobEntry,
    Conflict,
    DeleteFailure,
    Entry,
    NotFound,
    Storage,
    StorageError,
    TooLarge,
    split_sized,
)
from daemon.workers import in_parallel

T = TypeVar("T")

#: one listed object: (full key, size, mtime in epoch seconds, hex MD5 of its content or "")
Listed = tuple[str, int | None, float | None, str]

#: walk() lists each subtree this many levels below the v2 root on its own, concurrently
_SPLIT_DEPTH = 3
_REVISIONS = "/_manifests/revisions/sha256/"
_TAGS = "/_manifests/tags/"
_CURRENT = "current/link"
#: a revision link as distribution writes it: ``sha256:<64 hex>``, no newline
LINK_SIZE = len("sha256:") + 64
_LINK_TAIL = 64 + len("/link")
#: a layer link directory: distribution keeps nothing in it but ``link``
_LAYER_LINK_DIR = re.compile(rf"{layout.REPOSITORIES}.+/_layers/sha256/[0-9a-f]{{64}}/")
#: delete requests kept in flight for one call: a store deletes the keys of one request one
#: after another (SeaweedFS on 2 cores: ~2,100 keys/s in 1000-key requests, ~2,550 in 16 of 63)
_DELETE_STREAMS = 16
_DELETE_MIN = 50


class Kind(Enum):
    """What a failed request means to the retry loop and its callers."""

    MISSING = "missing"  # the key (or container) does not exist
    TRANSIENT = "transient"  # throttling, 5xx, a dropped connection, a timeout: retry
    DENIED = "denied"  # 401/403: credentials or permissions
    CONFLICT = "conflict"  # 409/412: a conditional write's condition did not hold
    FATAL = "fatal"  # anything else


class ServiceError(StorageError):
    """A request failed after retries; ``kind``/``code``/``status`` are the service's answer."""

    def __init__(self, message: str, kind: Kind, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.status = status

    @property
    def missing(self) -> bool:
        return self.kind is Kind.MISSING


class BatchRefused(Exception):
    """The service (an emulator) has no batch delete: delete key by key instead."""


@dataclass(slots=True)
class _FlatBlobs:
    """The first page of a flat listing of blobs/sha256/: what it holds, by shard."""

    fetched: float  # time.monotonic()
    covered: set[str]  # shards the page holds whole, not yet served
    shards: dict[str, list[BlobEntry]]


#: seconds a flat first page serves its shards: a run's sweep asks for them at once
_FLAT_TTL = 60.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter; the SDKs' own retries are off."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based): equal jitter."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


@dataclass(slots=True)
class Page:
    """One listing page: objects, common prefixes (full keys ending in '/'), continuation."""

    objects: list[Listed] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    token: str | None = None


@dataclass(frozen=True, slots=True)
class KeyFailure:
    """One key a batch delete did not delete: the service's reason, and whether to retry."""

    key: str  # full key
    reason: str
    transient: bool = False


def link_md5(hexdigest: str) -> str:
    """The MD5 (hex) of a revision link naming ``hexdigest``."""
    return hashlib.md5(b"sha256:" + hexdigest.encode(), usedforsecurity=False).hexdigest()


def _proven_link(relative: str, size: int | None, md5: str) -> bool:
    """True when a listed revision link provably holds ``sha256:<the hex in its path>``:
    the right size and the MD5 the service states equal to that content's."""
    if size != LINK_SIZE or not md5 or not relative.endswith("/link"):
        return False
    if not relative[:-_LINK_TAIL].endswith(_REVISIONS):
        return False
    return md5 == link_md5(relative[-_LINK_TAIL:-5])


class ObjectStore(Storage):
    """A registry store below ``<root>/docker/registry/v2/`` in a bucket or container.

    Drivers implement the ``_`` service calls below (one request each, no retries of their
    own) and ``_classify``; everything else, retries included, happens here."""

    listing_proves_data = True  # list_blob_shard names ``<hex>/data`` keys only

    #: most keys one batch delete request may name
    batch_max: int = 1000
    #: the service's word for its namespace, for errors ("bucket", "container")
    container_word: str = "bucket"
    #: objects over this size are copied by ``_copy_large`` (S3: CopyObject stops at 5 GiB)
    copy_limit: float = float("inf")
    #: a version no object has, for the conditional-write probe
    bogus_version: str = '"0123456789abcdef0123456789abcdef"'
    #: what to check when access is denied
    credentials_hint: str = "the credentials and permissions"

    #: the ``StorageSettings.driver`` (and section) this class serves; names its log events
    driver: str = ""

    def __init__(
        self,
        settings: StorageSettings,
        concurrency: int = 16,
        retry: RetryPolicy | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        if settings.driver != self.driver or getattr(settings, self.driver, None) is None:
            raise ValueError(f"not an {self.driver} storage configuration: {settings.driver}")
        self.settings = settings
        self.concurrency = max(1, concurrency)
        self.retry = retry or RetryPolicy()
        self.container, self.endpoint = self._locate()
        self.description = f"{settings.describe()} at {self.endpoint}"
        self.rootdirectory = settings.rootdirectory
        root = settings.rootdirectory.strip("/")
        self.prefix = f"{root}/{layout.V2_ROOT}/" if root else f"{layout.V2_ROOT}/"
        self._inflight = asyncio.Semaphore(self.concurrency)
        self._open_lock = asyncio.Lock()
        self._opened = False
        self._rng = random.Random()
        self._batch_refused = False
        #: whether the store honours conditional writes; None until asked
        self._conditional: bool | None = None
        #: (the store's Date, time.monotonic() when it came) of the last probe
        self._store_clock: tuple[float, float] | None = None
        #: revision links whose content the last repository scan proved (see _proven_link)
        #: by revisions directory, the raw digests (a set of whole keys took ~220 bytes a link)
        self._proven: dict[str, OnceSet] = {}
        #: tag links whose content the last scan proved: tag directory -> the raw digest its
        #: ``current/link`` names (only after ``expect_tag_reads``; see _prove_tag)
        self._proven_tags: dict[str, bytes] = {}
        self._tags_wanted = False
        #: while such a scan runs: tag directory -> the MD5 listed for its ``current/link``,
        #: until an index entry of that tag proves it
        self._tag_md5s: dict[str, str] | None = None
        #: the blob shards the first page of one flat listing of blobs/ held whole (_flat_shards)
        self._flat: _FlatBlobs | None = None
        self._flat_lock = asyncio.Lock()
        # never structlog's global default: it prints to stdout, where the CLI's summary goes
        log = log or logs.make_logger("warning", "json", sys.stderr)
        self._log = log.bind(storage=self.description)

    # -- the service's calls: one request each --------------------------------------------

    @abstractmethod
    def _locate(self) -> tuple[str, str]:
        """(bucket or container, the service's endpoint for people) from ``self.settings``."""

    @abstractmethod
    async def _connect(self) -> None:
        """Create the service client; no request is sent."""

    @abstractmethod
    async def _disconnect(self) -> None:
        """Close the service client and its connections."""

    @abstractmethod
    async def _check_container(self) -> float | None:
        """Raise unless the bucket/container exists and may be read; the store's time (its
        answer's Date) where the answer shows it."""

    @abstractmethod
    async def _list_page(self, prefix: str, delimiter: str | None, token: str | None) -> Page:
        """One listing page below the full key ``prefix``."""

    @abstractmethod
    async def _get(self, key: str, limit: int) -> bytes:
        """The content of the full key; raise ``self._too_large`` over ``limit`` bytes."""

    @abstractmethod
    async def _put(self, key: str, data: bytes) -> None:
        """Write the full key (atomic on every object store)."""

    @abstractmethod
    async def _get_versioned(self, key: str, limit: int) -> tuple[bytes, str]:
        """The content of the full key and its version (ETag, generation)."""

    @abstractmethod
    async def _put_if(self, key: str, data: bytes, version: str | None) -> str:
        """Create the full key if ``version`` is None, else replace it if still at
        ``version``; the new version. A failed condition is what _classify calls CONFLICT."""

    @abstractmethod
    async def _head(self, key: str) -> tuple[int | None, float | None]:
        """Size and mtime of the full key."""

    @abstractmethod
    async def _copy(self, src: str, dst: str) -> None:
        """Server-side copy of the full key ``src`` to ``dst``."""

    async def _copy_large(self, src: str, dst: str, size: int) -> None:
        """Copy an object over ``copy_limit`` (its requests each through ``_call``)."""
        raise StorageError(f"{self.description}: no copy above {self.copy_limit} bytes")

    @abstractmethod
    async def _delete_batch(self, keys: list[str]) -> list[KeyFailure]:
        """One batch delete of full keys (at most ``batch_max``): the keys not deleted
        (a missing key is deleted). Raise BatchRefused where the service has no batches."""

    @abstractmethod
    async def _delete_one(self, key: str) -> None:
        """Delete one full key (missing: raise what ``_classify`` calls MISSING)."""

    @abstractmethod
    def _classify(self, exc: BaseException) -> tuple[Kind, str, int] | None:
        """(kind, service code, HTTP status) of a failed call; None: not the service's."""

    def _describe(self, exc: BaseException) -> str:
        """The failure for people."""
        return f"{type(exc).__name__}: {exc}"

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the client (idempotent); no request is sent."""
        async with self._open_lock:
            if not self._opened:
                await self._connect()
                self._opened = True

    async def close(self) -> None:
        """Close the client and its connection pool."""
        async with self._open_lock:
            if self._opened:
                self._opened = False
                await self._disconnect()

    async def __aenter__(self) -> ObjectStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- keys, logs, retries -----------------------------------------------------------------

    def _key(self, relative: str) -> str:
        return self.prefix + relative

    def _sent_key(self, answered: str, asked: set[str]) -> str | None:
        """The relative key of ``asked`` a batch error names: as sent, or URL-encoded and/or
        with a leading slash, as some stores echo it; None when it names none."""
        for form in (answered, unquote(answered)):
            key = self._relative(form.lstrip("/"))
            if key in asked:
                return key
        return None

    def _relative(self, key: str) -> str:
        return key[len(self.prefix) :] if key.startswith(self.prefix) else key

    @property
    def log(self) -> structlog.typing.FilteringBoundLogger:
        """The running run's logger (its run_id) where there is one, else the driver's."""
        run_log = RUN_LOG.get()
        return run_log.bind(storage=self.description) if run_log is not None else self._log

    def _too_large(self, key: str, length: int, limit: int) -> TooLarge:
        return TooLarge(
            f"{self.description}: {self._relative(key)} has {length} bytes (limit {limit})"
        )

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` under the in-flight bound, retrying transient failures."""
        if not self._opened:
            await self.open()
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._inflight:
                    return await fn()
            except (StorageError, BatchRefused):
                raise
            except Exception as exc:
                found = self._classify(exc)
                kind, code, status = found if found is not None else (Kind.FATAL, "", 0)
                if kind is not Kind.TRANSIENT or attempt >= self.retry.attempts:
                    tries = f" after {attempt} attempts" if attempt > 1 else ""
                    raise ServiceError(
                        f"{self.description}: {what} failed{tries}: {self._describe(exc)}",
                        kind,
                        code,
                        status,
                    ) from exc
                delay = self.retry.delay(attempt, self._rng)
                self.log.warning(
                    f"{self.driver} request retried",
                    request=what,
                    attempt=attempt,
                    error=self._describe(exc),
                    delay=round(delay, 3),
                )
                await asyncio.sleep(delay)

    # -- listings ------------------------------------------------------------------------------

    async def _pages(self, prefix: str, delimiter: str | None = None) -> AsyncIterator[Page]:
        """Listing pages below the full key ``prefix``; each page is retried on its own."""
        seen: set[str] = set()
        token: str | None = None
        while True:
            page = await self._call(
                f"list {prefix!r}", functools.partial(self._list_page, prefix, delimiter, token)
            )
            token = page.token
            yield page
            # not held while the next page is fetched: each of a sweep's 16 listings kept two
            # or three pages alive (~500 B a key with its entries; issue 19)
            del page
            if token is None:
                return
            if not token or token in seen:
                # a listing that cannot go on must not pass for a complete one
                raise StorageError(
                    f"{self.description}: listing of {prefix!r} is truncated "
                    "but has no usable continuation token"
                )
            seen.add(token)

    def _entries(self, page: Page, prefix: str, prove: bool = False) -> list[Entry]:
        """The objects of a listing page; ``prove``: remember revision links it proves."""
        entries = []
        cut = len(self.prefix)
        for key, size, mtime, md5 in page.objects:
            # SeaweedFS and Azurite answer with "dir/" markers for empty directories
            if key.endswith("/") or not key.startswith(prefix):
                continue
            relative = key[cut:]
            entries.append(Entry(relative, size, mtime))
            if prove and md5 and _proven_link(relative, size, md5):
                head, tail = relative[:-_LINK_TAIL], relative[-_LINK_TAIL:-5]
                proven = self._proven.get(head)
                if proven is None:
                    # packed: ~33 B a revision link where a set took ~120 (issue 19)
                    proven = self._proven[head] = OnceSet()
                proven.add(bytes.fromhex(tail))
            elif prove and self._tag_md5s is not None and _TAGS in relative:
                self._prove_tag(relative, size, md5, self._tag_md5s)
        return entries

    def _prove_tag(
        self, relative: str, size: int | None, md5: str, pending: dict[str, str]
    ) -> None:
        """A tag's ``current/link`` names a digest its own path does not: its listed MD5 is
        kept until one of the tag's ``index/sha256/<hex>/link`` entries (distribution writes
        one for each digest the tag named) gives a ``<hex>`` whose link text has that MD5.
        That proves the content (an MD5 preimage is infeasible); a tag no entry proves, or
        whose listing gave no MD5 (a multipart ETag, Azure without Content-MD5), is read by
        GET. Keys come in order: a tag's ``current/`` before its ``index/``."""
        head, _, rest = relative.partition(_TAGS)
        tag, _, tail = rest.partition("/")
        directory = f"{head}{_TAGS}{tag}/"
        if tail == _CURRENT:
            if md5 and size == LINK_SIZE:
                pending[directory] = md5
            return
        want = pending.get(directory)
        if want is None or not tail.startswith("index/sha256/") or not tail.endswith("/link"):
            return
        hexdigest = tail[len("index/sha256/") : -len("/link")]
        if layout.is_hex(hexdigest) and link_md5(hexdigest) == want:
            del pending[directory]
            self._proven_tags[directory] = bytes.fromhex(hexdigest)

    async def probe(self) -> None:
        """The bucket/container exists and may be read, and holds objects below the v2 root."""
        name = f"{self.container_word} {self.container!r}"
        where = f"{name} at {self.endpoint}"
        try:
            date = await self._call(f"check {self.container_word}", self._check_container)
        except ServiceError as exc:
            if exc.missing:
                setting = f"storage.{self.driver}.{self.container_word}"
                raise StorageError(
                    f"{name} does not exist at {self.endpoint} (check {setting})"
                ) from exc
            if exc.kind is Kind.DENIED:
                raise StorageError(
                    f"access to {where} denied (check {self.credentials_hint}): {exc}"
                ) from exc
            raise StorageError(f"{where} is not usable: {exc}") from exc
        if date is not None:
            self._store_clock = (date, time.monotonic())
        page = await self._call("probe listing", lambda: self._list_page(self.prefix, None, None))
        if not self._entries(page, self.prefix):
            raise StorageError(
                f"{where} has no registry data: no object below {self.prefix!r} "
                f"(check rootdirectory {self.rootdirectory!r})"
            )

    def warm_up(self) -> None:
        # a run starts: its sweep lists the blobs afresh
        self._flat = None

    async def list_blob_shard(self, shard: str) -> list[BlobEntry]:
        """One flat listing of ``blobs/sha256/<shard>/``; size and mtime come from it."""
        found: list[BlobEntry] = []
        async for page in self._shard_pages(shard):
            found += page
        return found

    async def _shard_pages(self, shard: str) -> AsyncIterator[list[BlobEntry]]:
        """``shard``'s blobs a listing page at a time (or the flat first page's share)."""
        if len(shard) != 2 or any(c not in "0123456789abcdef" for c in shard):
            raise ValueError(f"not a blob shard: {shard!r}")
        served = await self._flat_shard(shard)
        if served is not None:
            yield served
            return
        prefix = self._key(f"{layout.BLOBS}{shard}/")
        cut = len(prefix)
        async for page in self._pages(prefix):
            found: list[BlobEntry] = []
            for key, size, mtime, _md5 in page.objects:
                hexdigest, _, tail = key[cut:].partition("/")
                if (
                    tail == "data"
                    and key.startswith(prefix)
                    and layout.is_hex(hexdigest)
                    and hexdigest.startswith(shard)
                ):
                    found.append(BlobEntry(hexdigest, size, mtime))
            del page
            yield found
            del found  # as in ``_pages``: not held across the next request

    async def blobs_outside(
        self, shard: str, members: AbstractSet[bytes]
    ) -> tuple[int, list[BlobEntry]]:
        """The shard's listing filtered a page at a time: only the blobs outside ``members``
        are kept, where the whole shard's entries were (~250 B a blob, 16 shards in flight:
        ~16 B a blob of the store at any size; issue 19)."""
        count = 0
        outside: list[BlobEntry] = []
        async for page in self._shard_pages(shard):
            count += len(page)
            outside += [e for e in page if bytes.fromhex(e.hex) not in members]
            del page  # not held across the next request
        # every listed key is a ``<hex>/data`` object: size and mtime came with it
        return count, await self._with_data(outside)

    async def blobs_outside_sized(
        self, shard: str, members: AbstractSet[bytes]
    ) -> tuple[int, list[BlobEntry], bytes]:
        """``blobs_outside``, and the in-use blobs' sizes as ``size_record``s, a page at a time."""
        count = 0
        outside: list[BlobEntry] = []
        sized = bytearray()
        async for page in self._shard_pages(shard):
            count += len(page)
            split_sized(page, members, outside, sized)
            del page  # not held across the next request
        return count, await self._with_data(outside), bytes(sized)

    async def _flat_shard(self, shard: str) -> list[BlobEntry] | None:
        """``shard``'s blobs from the first page of a flat listing of ``blobs/sha256/``,
        where that page held the shard whole; None where a listing of its own is needed.

        A store whose blobs fit in one page (5,000 keys on Azure, 1,000 on S3 and GCS) is
        listed in one request instead of 256; on a larger one the page spares the shards it
        covers. Each shard is served once (a later ask, as verify's after a delete, lists
        afresh), and only to the run that fetched it (``warm_up``) or soon after."""
        async with self._flat_lock:
            flat = self._flat
            if flat is None or time.monotonic() - flat.fetched > _FLAT_TTL:
                flat = self._flat = await self._first_blob_page()
        if shard not in flat.covered:
            return None
        flat.covered.discard(shard)
        return flat.shards.pop(shard, [])

    async def _first_blob_page(self) -> _FlatBlobs:
        prefix = self._key(layout.BLOBS)
        page = await self._call(
            f"list {prefix!r}", functools.partial(self._list_page, prefix, None, None)
        )
        cut = len(prefix)
        shards: dict[str, list[BlobEntry]] = {}
        names = []
        for key, size, mtime, _md5 in page.objects:
            name = key[cut:]
            names.append(name)
            hexdigest, _, tail = name[3:].partition("/")
            if (
                tail == "data"
                and key.startswith(prefix)
                and name[2:3] == "/"
                and layout.is_hex(hexdigest)
                and hexdigest.startswith(name[:2])
            ):
                shards.setdefault(name[:2], []).append(BlobEntry(hexdigest, size, mtime))
        if page.token is None:
            covered = set(layout.SHARDS)  # the whole of blobs/ in one page
        elif names and names == sorted(names):
            # listings come in key order: every shard before the page's last one is whole
            covered = {s for s in layout.SHARDS if s < names[-1][:2]}
        else:
            covered = set()
        return _FlatBlobs(time.monotonic(), covered, shards)

    async def walk(self, prefix: str) -> AsyncIterator[list[Entry]]:
        """Every object below ``prefix``: flat listings of its subtrees, run concurrently."""
        async for batch in self._walk(prefix, prove=False, layers=None):
            yield batch

    async def scan_repositories(self, layers: bool = True) -> AsyncIterator[list[str]]:
        """Keys under repositories/, each section of each repository a flat listing of its own
        (without ``layers``, ``_layers/`` is named, not listed). The listing's MD5s prove most
        revision links' content, so that the mark reads them from memory instead of one GET
        each (half its requests)."""
        self._proven.clear()
        self._proven_tags.clear()
        # tag links only for a run that reads them next: a plain check would hold them unread
        self._tag_md5s = {} if self._tags_wanted else None
        self._tags_wanted = False
        try:
            async for batch in self._walk(layout.REPOSITORIES, prove=True, layers=layers):
                yield [entry.key for entry in batch]
        finally:
            self._tag_md5s = None  # the tags no index entry proved are read by GET

    def expect_tag_reads(self) -> None:
        self._tags_wanted = True

    async def read_many(self, keys: Sequence[str], limit: int) -> list[bytes | None]:
        """``read`` of each key, concurrently; revision and tag links the scan proved need no
        GET.

        A proven link is used once: a second read, or one after the next scan, asks again."""
        out: list[bytes | None] = [None] * len(keys)
        fetch: list[int] = []
        tags = self._proven_tags if limit >= LINK_SIZE else None
        for i, key in enumerate(keys):
            if tags and key.endswith(_CURRENT):
                named = tags.pop(key[: -len(_CURRENT)], None)
                if named is not None:
                    out[i] = b"sha256:" + named.hex().encode()
                    continue
            head, tail = key[:-_LINK_TAIL], key[-_LINK_TAIL:]
            proven = self._proven.get(head) if limit >= LINK_SIZE else None
            if proven and tail.endswith("/link") and layout.is_hex(tail[:-5]):
                raw = bytes.fromhex(tail[:-5])
                if proven.take(raw):
                    if not proven:
                        del self._proven[head]
                    out[i] = b"sha256:" + tail[:-5].encode()
                    continue
            fetch.append(i)
        if fetch:
            found = await super().read_many([keys[i] for i in fetch], limit)
            for i, data in zip(fetch, found, strict=True):
                out[i] = data
        return out

    async def _walk(
        self, prefix: str, prove: bool, layers: bool | None
    ) -> AsyncIterator[list[Entry]]:
        """Every object below ``prefix``. ``layers`` None: split by depth. Else ``prefix`` is
        repositories/: split down to the repositories' sections, ``_layers/`` listed only when
        ``layers`` is True."""
        queue: asyncio.Queue[list[Entry] | BaseException | None] = asyncio.Queue(
            maxsize=2 * self.concurrency
        )
        producer = asyncio.create_task(self._walk_into(_dir(prefix), queue, prove, layers))
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer

    async def _walk_into(
        self,
        prefix: str,
        queue: asyncio.Queue[list[Entry] | BaseException | None],
        prove: bool,
        layers: bool | None,
    ) -> None:
        flat_slots = asyncio.Semaphore(self.concurrency)

        async def flat(relative: str) -> None:
            full = self._key(relative)
            async with flat_slots:
                async for page in self._pages(full):
                    entries = self._entries(page, full, prove)
                    del page  # neither is held while the queue is full or the next page comes
                    if entries:
                        await queue.put(entries)
                    del entries

        async def split(relative: str, group: asyncio.TaskGroup) -> None:
            # only the upper levels are split: deeper down a delimiter listing would cost one
            # request per tiny directory. By depth (blobs/sha256/<xx>/), or for repositories/
            # down to each repository's sections: no name component starts with "_"
            if layers is None and relative.count("/") >= _SPLIT_DEPTH:
                await flat(relative)
                return
            full = self._key(relative)
            async for page in self._pages(full, delimiter="/"):
                entries = self._entries(page, full, prove)
                if entries:
                    await queue.put(entries)
                for common in page.prefixes:
                    child = self._relative(common)
                    if layers is None or not child[:-1].rpartition("/")[2].startswith("_"):
                        group.create_task(split(child, group))
                    elif not layers and child.endswith("/_layers/"):
                        await queue.put([Entry(child)])
                    else:
                        group.create_task(flat(child))

        try:
            async with asyncio.TaskGroup() as group:
                await split(prefix, group)
        except Exception as exc:
            await queue.put(first_error(exc))
            return
        await queue.put(None)

    async def list_dir(self, prefix: str) -> tuple[list[str], list[str]]:
        """Delimiter listing: (file names, directory names) one level below ``prefix``."""
        full = self._key(_dir(prefix))
        files: list[str] = []
        dirs: list[str] = []
        async for page in self._pages(full, delimiter="/"):
            files.extend(entry.key.rsplit("/", 1)[-1] for entry in self._entries(page, full))
            for common in page.prefixes:
                name = common[len(full) :].rstrip("/")
                if name:
                    dirs.append(name)
        return files, dirs

    # -- single objects ------------------------------------------------------------------------

    async def stat(self, key: str) -> Entry | None:
        """Size and mtime; None when the key does not exist."""
        full = self._key(key)
        try:
            size, mtime = await self._call(f"stat {key!r}", lambda: self._head(full))
        except ServiceError as exc:
            if exc.missing:
                return None
            raise
        return Entry(key, size, mtime)

    async def read(self, key: str, limit: int) -> bytes:
        """The whole object; TooLarge before downloading when its length exceeds ``limit``."""
        return await self._fetch(key, lambda full: self._get(full, limit))

    async def _fetch(self, key: str, get: Callable[[str], Awaitable[T]]) -> T:
        """``get`` of the full key through the retries; NotFound where it does not exist."""
        full = self._key(key)
        try:
            return await self._call(f"read {key!r}", lambda: get(full))
        except ServiceError as exc:
            if exc.missing:
                raise NotFound(f"{self.description}: {key} does not exist") from exc
            raise

    async def write(self, key: str, data: bytes) -> None:
        """One upload (atomic on an object store)."""
        full = self._key(key)
        await self._call(f"write {key!r}", lambda: self._put(full, data))

    def clock(self) -> float | None:
        """The store's time now, from the Date of the last probe's answer: the service stamps
        modification times with its own clock, which need not agree with this host's. Date is
        whole seconds and stamped before the answer arrived: never overestimated."""
        if self._store_clock is None:
            return None
        stamped, at = self._store_clock
        return stamped + (time.monotonic() - at)

    async def move(self, src: str, dst: str) -> bool:
        """Server-side copy then delete: object stores have no rename (online deletes park
        blobs this way). Objects over ``copy_limit`` go through ``_copy_large``."""
        entry = await self.stat(src)
        if entry is None:
            return False
        source, target = self._key(src), self._key(dst)
        try:
            if entry.size is not None and entry.size > self.copy_limit:
                await self._copy_large(source, target, entry.size)
            else:
                await self._call(f"move {src!r}", lambda: self._copy(source, target))
        except ServiceError as exc:
            if exc.missing:
                return False
            raise
        failures = await self.delete_keys([src])
        if failures:
            raise StorageError(f"moved {src!r} but cannot remove it: {failures[0].reason}")
        return True

    async def move_keys(
        self, moves: Sequence[tuple[str, str, int | None]]
    ) -> tuple[list[str], list[DeleteFailure]]:
        """Server-side copies, several in flight, then the sources' batched deletes (the
        trash's moves: two requests per key where ``move`` takes three)."""
        failures: list[DeleteFailure] = []

        async def copy(src: str, dst: str, size: int | None) -> bool:
            source, target = self._key(src), self._key(dst)
            try:
                if size is not None and size > self.copy_limit:
                    await self._copy_large(source, target, size)
                else:
                    await self._call(f"copy {src!r}", lambda: self._copy(source, target))
            except ServiceError as exc:
                if exc.missing:
                    return False
                if size is None and self.copy_limit != float("inf"):
                    # a size we did not know may be over the service's copy limit
                    entry = await self.stat(src)
                    if entry is not None and (entry.size or 0) > self.copy_limit:
                        await self._copy_large(source, target, entry.size or 0)
                        return True
                failures.append(DeleteFailure(src, str(exc)))
                return False
            except StorageError as exc:
                failures.append(DeleteFailure(src, str(exc)))
                return False
            return True

        copied = await in_parallel(moves, lambda move: copy(*move), self.concurrency)
        sources = [move[0] for move, done in zip(moves, copied, strict=True) if done]
        not_removed = await self.delete_keys(sources)
        left = {f.key for f in not_removed}
        # a source copied but not removed exists twice: named, so the caller can judge
        failures += [
            DeleteFailure(f.key, f"copied but not removed: {f.reason}") for f in not_removed
        ]
        return [s for s in sources if s not in left], failures

    # -- conditional writes (the lease) --------------------------------------------------------

    async def conditional_writes(self) -> bool:
        """Whether the store refuses a conditional write whose condition fails (AWS since
        2024, SeaweedFS 4.x, Azure, GCS: yes; older MinIO and Ceph RGW may ignore them):
        asked once, on a probe object."""
        if self._conditional is None:
            key = "_registry-pruned/conditional-write-probe"
            await self.write(key, b"probe")
            honoured = True
            for version in (None, self.bogus_version):
                try:
                    await self.write_if(key, b"must be refused", version)
                    honoured = False  # written although the condition did not hold
                except Conflict:
                    pass
                except ServiceError:
                    honoured = False  # not implemented, or an unknown header refused
            await self.delete_keys([key])
            self._conditional = honoured
            if not honoured:
                self.log.warning(
                    f"{self.driver} store ignores conditional writes: lease by write-and-settle"
                )
        return self._conditional

    async def read_versioned(self, key: str, limit: int) -> tuple[bytes, str]:
        """The content and its version for ``write_if``; NotFound if missing."""
        return await self._fetch(key, lambda full: self._get_versioned(full, limit))

    async def write_if(self, key: str, data: bytes, version: str | None) -> str:
        """Create (``version`` None) or replace ``key`` if unchanged; Conflict otherwise."""
        full = self._key(key)
        try:
            return await self._call(
                f"write {key!r} if unchanged", lambda: self._put_if(full, data, version)
            )
        except ServiceError as exc:
            if exc.kind is Kind.CONFLICT:
                raise Conflict(f"{self.description}: {key} changed: not written") from exc
            raise

    # -- deletes -----------------------------------------------------------------------------

    async def delete_blobs(self, hexes: Sequence[str]) -> list[DeleteFailure]:
        """Delete ``blobs/sha256/<xx>/<hex>/data``; an object store has no directory left."""
        failures = [
            DeleteFailure(h, "not a sha256 hex digest") for h in hexes if not layout.is_hex(h)
        ]
        keys = [layout.blob_data(h) for h in hexes if layout.is_hex(h)]
        # blobs/sha256/<xx>/<hex>/data -> <hex>
        failures += [
            DeleteFailure(f.key.rsplit("/", 2)[-2], f.reason) for f in await self.delete_keys(keys)
        ]
        return failures

    async def delete_keys(self, keys: Sequence[str]) -> list[DeleteFailure]:
        """Batch deletes of at most ``batch_max`` keys, several in flight; the keys not
        deleted become DeleteFailures named by their relative key."""
        failures: list[DeleteFailure] = []
        wanted: list[str] = []
        for key in dict.fromkeys(keys):
            if not key or key.endswith("/") or key.startswith("/"):
                failures.append(DeleteFailure(key, "not an object key"))
            else:
                wanted.append(key)
        streams = min(_DELETE_STREAMS, self.concurrency)
        size = min(self.batch_max, max(_DELETE_MIN, -(-len(wanted) // streams)))
        batches = [wanted[i : i + size] for i in range(0, len(wanted), size)]
        for result in await asyncio.gather(*(self._delete_keys_batch(b) for b in batches)):
            failures.extend(result)
        return failures

    async def _delete_keys_batch(self, keys: list[str]) -> list[DeleteFailure]:
        """One batch (relative keys), its keys that failed transiently retried."""
        failed: dict[str, str] = {}
        pending = keys
        for attempt in range(1, self.retry.attempts + 1):
            if self._batch_refused:
                return failures_of(failed) + await self._delete_singly(pending)
            fulls = [self._key(k) for k in pending]
            try:
                answer = await self._call(
                    f"delete {len(pending)} keys", functools.partial(self._delete_batch, fulls)
                )
            except BatchRefused as exc:
                if not self._batch_refused:
                    self._batch_refused = True
                    self.log.warning(
                        f"{self.driver} batch deletes refused: deleting key by key",
                        reason=str(exc),
                    )
                return failures_of(failed) + await self._delete_singly(pending)
            except StorageError as exc:
                self.log.warning(
                    f"{self.driver} delete batch failed", keys=len(pending), error=str(exc)
                )
                failed.update((k, str(exc)) for k in pending)
                break
            asked = set(pending)
            again: list[str] = []
            for error in answer:
                key = self._sent_key(error.key, asked)
                if key is None:
                    # an error we cannot pin on a key: any of them may have stayed
                    reason = (
                        f"the store reported an error for a key it was not sent "
                        f"({error.key[:200]!r}: {error.reason}); the whole batch counts as failed"
                    )
                    failed.update((k, reason) for k in pending)
                    again = []
                    break
                if error.transient and attempt < self.retry.attempts:
                    again.append(key)
                else:
                    failed[key] = error.reason
            if not again:
                break
            pending = again
            await asyncio.sleep(self.retry.delay(attempt, self._rng))
        if failed:
            self.log.warning(f"{self.driver} keys not deleted", failed=len(failed), of=len(keys))
        return failures_of(failed)

    async def _delete_singly(self, keys: list[str]) -> list[DeleteFailure]:
        """Each key on its own request (where batches are refused); missing keys are deleted."""

        async def one(key: str) -> DeleteFailure | None:
            full = self._key(key)
            try:
                await self._call(f"delete {key!r}", lambda: self._delete_one(full))
            except ServiceError as exc:
                return None if exc.missing else DeleteFailure(key, str(exc))
            return None

        found = await in_parallel(keys, one, self.concurrency)
        failures = [f for f in found if f is not None]
        if failures:
            self.log.warning(f"{self.driver} keys not deleted", failed=len(failures), of=len(keys))
        return failures

    async def delete_trees(self, prefixes: Sequence[str]) -> list[DeleteFailure]:
        """Everything below each prefix, in shared batches. Trees are listed concurrently,
        except layer link directories: their one key, ``link``, is deleted without a listing
        (one request per orphan's link would bound the delete rate)."""
        owner: dict[str, str] = {}  # key -> the prefix it was deleted for
        listed: list[str] = []
        for prefix in prefixes:
            if not prefix.strip("/"):
                raise ValueError("delete_trees needs non-empty prefixes")
            directory = _dir(prefix)
            if _LAYER_LINK_DIR.fullmatch(directory):
                owner[directory + "link"] = prefix
            else:
                listed.append(prefix)

        async def below(prefix: str) -> list[str]:
            full = self._key(_dir(prefix))
            return [e.key async for page in self._pages(full) for e in self._entries(page, full)]

        for prefix, found in zip(
            listed, await in_parallel(listed, below, self.concurrency), strict=True
        ):
            owner.update(dict.fromkeys(found, prefix))
        return _by_prefix(await self.delete_keys(list(owner)), owner)

    async def delete_tree(self, prefix: str) -> list[DeleteFailure]:
        """List everything below ``prefix`` and delete it in batches."""
        return await self.delete_trees([prefix])


def listing_query(
    names: tuple[str, str, str],
    prefix: str,
    delimiter: str | None,
    token: str | None,
    **fixed: str,
) -> dict[str, str]:
    """A listing request's query: ``fixed``, then the prefix, delimiter and continuation
    under the service's ``names`` for them (the last two where given)."""
    query = {**fixed, names[0]: prefix}
    pairs = zip(names[1:], (delimiter, token), strict=True)
    query.update((name, value) for name, value in pairs if value)
    return query


def failures_of(failed: Mapping[str, str]) -> list[DeleteFailure]:
    return [DeleteFailure(k, reason) for k, reason in failed.items()]


def _by_prefix(failures: list[DeleteFailure], owner: Mapping[str, str]) -> list[DeleteFailure]:
    """One failure per prefix not wholly deleted, named by that prefix."""
    out: dict[str, DeleteFailure] = {}
    for failure in failures:
        prefix = owner.get(failure.key, failure.key)
        out.setdefault(prefix, DeleteFailure(prefix, failure.reason))
    return list(out.values())


def _dir(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def first_error(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (TaskGroup wraps what the listings raised)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
