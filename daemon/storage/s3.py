"""S3 driver on aiobotocore: flat sharded listings, batched DeleteObjects, bounded retries."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import random
import re
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote, unquote_plus, urlsplit

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.credentials import AioCredentials
from aiobotocore.session import AioSession, get_session
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.utils import parse_timestamp

from daemon import layout, logs
from daemon.config import StorageSettings
from daemon.storage.base import (
    BlobEntry,
    Conflict,
    DeleteFailure,
    Entry,
    NotFound,
    Storage,
    StorageError,
    TooLarge,
)

T = TypeVar("T")

#: S3's limit for one DeleteObjects request and the page size of ListObjectsV2
BATCH = 1000
_RETRY_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequests",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
    }
)
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
#: walk() lists each subtree this many levels below the v2 root on its own, concurrently
_SPLIT_DEPTH = 3
_REVISIONS = "/_manifests/revisions/sha256/"
#: a revision link as distribution writes it: ``sha256:<64 hex>``, no newline
_LINK_SIZE = len("sha256:") + 64
_LINK_TAIL = 64 + len("/link")
#: a layer link directory: distribution keeps nothing in it but ``link``
_LAYER_LINK_DIR = re.compile(rf"{layout.REPOSITORIES}.+/_layers/sha256/[0-9a-f]{{64}}/")
#: DeleteObjects requests kept in flight for one call: a store deletes the keys of one
#: request one after another (SeaweedFS on 2 cores: ~2,100 keys/s in 1000-key requests,
#: ~2,550 in 16 requests of 63)
_DELETE_STREAMS = 16
_DELETE_MIN = 50


class S3Error(StorageError):
    """An S3 request failed; ``code``/``status`` are S3's answer when there was one."""

    def __init__(self, message: str, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter; botocore's own retries are off."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based): equal jitter."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


def _client_error_parts(exc: ClientError) -> tuple[str, str, int]:
    error = exc.response.get("Error") or {}
    status = int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return str(error.get("Code") or ""), str(error.get("Message") or ""), status


def is_transient(exc: BaseException) -> bool:
    """True for throttling, 5xx, dropped connections and timeouts: worth another attempt."""
    if isinstance(exc, ClientError):
        code, _, status = _client_error_parts(exc)
        return code in _RETRY_CODES or status >= 500 or status == 429
    if isinstance(exc, SSLError):
        return False
    if type(exc) is HTTPClientError:
        # botocore's catch-all also carries a missing CA bundle or a bad certificate
        inner = getattr(exc, "kwargs", {}).get("error")
        return isinstance(inner, ConnectionError | TimeoutError | aiohttp.ClientError)
    return isinstance(
        exc,
        BotoConnectionError
        | HTTPClientError
        | IncompleteReadError
        | aiohttp.ClientError
        | ConnectionError
        | TimeoutError,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        code, message, status = _client_error_parts(exc)
        return f"{code or 'error'}: {message or 'no message'} (HTTP {status})"
    return f"{type(exc).__name__}: {exc}"


def _add_content_md5(request: Any, **_: Any) -> None:
    """Put Content-MD5 on DeleteObjects: botocore >= 1.36 sends only a CRC32 checksum,
    which older Ceph RGW and MinIO refuse ("Missing required header ... Content-MD5")."""
    body = request.body
    if isinstance(body, bytes | bytearray) and "Content-MD5" not in request.headers:
        digest = hashlib.md5(body, usedforsecurity=False).digest()
        request.headers["Content-MD5"] = base64.b64encode(digest).decode("ascii")


def _timestamp(value: Any) -> datetime:
    """Botocore's timestamp parser without dateutil, which took a third of a check's CPU:
    listings carry ISO 8601 (``2024-01-01T00:00:00.000Z``), headers RFC 1123."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            try:
                parsed = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return parse_timestamp(value)
        # S3 times are UTC; botocore's own parser answers aware datetimes too
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    return parse_timestamp(value)


def _proven_link(key: str, item: Mapping[str, Any]) -> bool:
    """True when a listed revision link provably holds ``sha256:<the hex in its path>``:
    the right size, and an ETag (the MD5 of a single-part PUT) equal to that content's."""
    if item.get("Size") != _LINK_SIZE or not key.endswith("/link"):
        return False
    if not key[:-_LINK_TAIL].endswith(_REVISIONS):
        return False
    etag = str(item.get("ETag") or "").strip('"')
    expected = b"sha256:" + key[-_LINK_TAIL:-5].encode()
    return etag == hashlib.md5(expected, usedforsecurity=False).hexdigest()


def _client_error(status: int, body: bytes, operation: str) -> ClientError:
    """An S3 error answer as botocore would raise it (code and status drive the retries)."""
    code = message = ""
    if body:
        with contextlib.suppress(ET.ParseError):
            root = ET.fromstring(body)
            code, message = root.findtext("{*}Code") or "", root.findtext("{*}Message") or ""
    # botocore names a bodiless error by its status ("404"), and so does _MISSING_CODES
    error = {"Code": code or str(status), "Message": message}
    return ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _parse_listing(body: bytes) -> dict[str, Any] | None:
    """A ListObjectsV2 answer -> the fields of botocore's parse that the driver reads;
    None unless it is a complete ListBucketResult document."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    if _local(root.tag) != "ListBucketResult":
        return None
    contents: list[dict[str, Any]] = []
    prefixes: list[dict[str, str]] = []
    page: dict[str, Any] = {"Contents": contents, "CommonPrefixes": prefixes, "IsTruncated": False}
    for node in root:
        tag = _local(node.tag)
        if tag == "Contents":
            item: dict[str, Any] = {}
            for field in node:
                name, text = _local(field.tag), field.text or ""
                if name == "Key" or name == "ETag":
                    item[name] = text
                elif name == "Size":
                    item[name] = int(text)
                elif name == "LastModified":
                    item[name] = _timestamp(text)
            contents.append(item)
        elif tag == "CommonPrefixes":
            prefixes.append({"Prefix": node.findtext("{*}Prefix") or ""})
        elif tag == "IsTruncated":
            page["IsTruncated"] = (node.text or "").strip().lower() == "true"
        elif tag in ("NextContinuationToken", "EncodingType"):
            page[tag] = node.text or ""
    if page.get("EncodingType") == "url":
        # asked for: keys are URL-encoded so that any byte survives XML (botocore decodes too)
        for item in contents:
            item["Key"] = unquote_plus(item.get("Key", ""))
        for common in prefixes:
            common["Prefix"] = unquote_plus(common["Prefix"])
    return page


def _endpoint_url(regionendpoint: str | None, secure: bool) -> str | None:
    if not regionendpoint:
        return None
    if "://" in regionendpoint:
        return regionendpoint.rstrip("/")
    scheme = "https" if secure else "http"
    return f"{scheme}://{regionendpoint.rstrip('/')}"


class S3Storage(Storage):
    """A registry store in an S3 bucket below ``<rootdirectory>/docker/registry/v2/``."""

    def __init__(
        self,
        settings: StorageSettings,
        concurrency: int = 16,
        retry: RetryPolicy | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        if settings.driver != "s3" or settings.s3 is None:
            raise ValueError(f"not an s3 storage configuration: {settings.driver}")
        self.settings = settings
        self.s3 = settings.s3
        self.concurrency = max(1, concurrency)
        self.retry = retry or RetryPolicy()
        self.bucket = self.s3.bucket
        root = settings.rootdirectory.strip("/")
        self.prefix = f"{root}/{layout.V2_ROOT}/" if root else f"{layout.V2_ROOT}/"
        self.endpoint_url = _endpoint_url(self.s3.regionendpoint, self.s3.secure)
        self.endpoint = self.endpoint_url or f"AWS S3 in {self.s3.region}"
        self.description = f"{settings.describe()} at {self.endpoint}"
        self._inflight = asyncio.Semaphore(self.concurrency)
        self._open_lock = asyncio.Lock()
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._session: AioSession | None = None
        #: (URL of the bucket's root with a trailing "/", credentials) for signed GETs
        self._route: tuple[str, Any] | None = None
        self._rng = random.Random()
        #: revision links whose content the last repository scan proved (see _proven_link)
        #: by revisions directory, the raw digests (a set of whole keys took ~220 bytes a link)
        self._proven: dict[str, set[bytes]] = {}
        #: whether the store honours conditional writes; None until asked
        self._conditional: bool | None = None
        #: (the store's Date, time.monotonic() when it came) of the last probe
        self._store_clock: tuple[float, float] | None = None
        # never structlog's global default: it prints to stdout, where the CLI's summary goes
        log = log or logs.make_logger("warning", "json", sys.stderr)
        self._log = log.bind(storage=self.description)

    # -- client lifecycle -------------------------------------------------------------

    def _verify(self) -> bool | str | None:
        if self.s3.skipverify:
            return False
        scheme = urlsplit(self.endpoint_url).scheme if self.endpoint_url else "https"
        if scheme == "http" or (not self.endpoint_url and not self.s3.secure):
            # aiobotocore loads AWS_CA_BUNDLE even for plain http and fails if it is unusable
            return False
        return self.s3.ca_bundle or None

    async def open(self) -> None:
        """Create the S3 client (idempotent); no request is sent."""
        async with self._open_lock:
            if self._client is not None:
                return
            config = AioConfig(
                region_name=self.s3.region,
                signature_version="s3v4",
                s3={"addressing_style": "path" if self.s3.forcepathstyle else "auto"},
                # one attempt per call: the retry loop below is the one that counts
                retries={"mode": "standard", "total_max_attempts": 1},
                max_pool_connections=self.concurrency,
                connect_timeout=self.retry.connect_timeout,
                read_timeout=self.retry.read_timeout,
                # flexible checksums (aws-chunked trailers) break older S3-compatible stores
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                user_agent_extra="registry-pruned",
            )
            kwargs: dict[str, Any] = {
                "region_name": self.s3.region,
                "endpoint_url": self.endpoint_url,
                "use_ssl": self.s3.secure,
                "verify": self._verify(),
                "config": config,
            }
            if self.s3.accesskey and self.s3.secretkey:
                kwargs["aws_access_key_id"] = self.s3.accesskey
                kwargs["aws_secret_access_key"] = self.s3.secretkey
            session = get_session()
            session.get_component("response_parser_factory").set_parser_defaults(
                timestamp_parser=_timestamp
            )
            stack = AsyncExitStack()
            try:
                client = await stack.enter_async_context(session.create_client("s3", **kwargs))
            except (BotoCoreError, ValueError) as exc:
                await stack.aclose()
                raise StorageError(f"{self.description}: cannot create S3 client: {exc}") from exc
            client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)
            self._client, self._stack, self._session = client, stack, session

    async def close(self) -> None:
        """Close the client and its connection pool."""
        async with self._open_lock:
            stack, self._stack, self._client = self._stack, None, None
            self._session, self._route = None, None
            if stack is not None:
                await stack.aclose()

    async def __aenter__(self) -> S3Storage:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- requests ---------------------------------------------------------------------

    def _key(self, relative: str) -> str:
        return self.prefix + relative

    def _relative(self, key: str) -> str:
        return key[len(self.prefix) :] if key.startswith(self.prefix) else key

    async def _call(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``fn(client)`` under the in-flight bound, retrying transient failures."""
        if self._client is None:
            await self.open()
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._inflight:
                    return await fn(self._client)
            except StorageError:
                raise
            except Exception as exc:
                if not is_transient(exc):
                    raise self._error(what, exc, attempt) from exc
                if attempt >= self.retry.attempts:
                    raise self._error(what, exc, attempt) from exc
                delay = self.retry.delay(attempt, self._rng)
                self._log.warning(
                    "s3 request retried",
                    request=what,
                    attempt=attempt,
                    error=_describe(exc),
                    delay=round(delay, 3),
                )
                await asyncio.sleep(delay)

    def _error(self, what: str, exc: Exception, attempts: int) -> S3Error:
        code, status = "", 0
        if isinstance(exc, ClientError):
            code, _, status = _client_error_parts(exc)
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return S3Error(f"{self.description}: {what} failed{tries}: {_describe(exc)}", code, status)

    async def _op(self, what: str, operation: str, **params: Any) -> dict[str, Any]:
        async def run(client: Any) -> dict[str, Any]:
            return await getattr(client, operation)(Bucket=self.bucket, **params)

        return await self._call(what, run)

    async def _pages(
        self, prefix: str, delimiter: str | None = None
    ) -> AsyncIterator[Mapping[str, Any]]:
        """ListObjectsV2 pages below the full key ``prefix``; each page is retried on its own."""
        params: dict[str, Any] = {"Prefix": prefix, "MaxKeys": BATCH}
        if delimiter:
            params["Delimiter"] = delimiter
        seen: set[str] = set()
        while True:
            page = await self._list_page(prefix, params)
            yield page
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            if not token or token in seen:
                # a listing that cannot go on must not pass for a complete one
                raise StorageError(
                    f"{self.description}: listing of {prefix!r} is truncated "
                    "but has no usable continuation token"
                )
            seen.add(token)
            params["ContinuationToken"] = token

    async def _list_page(self, prefix: str, params: Mapping[str, Any]) -> Mapping[str, Any]:
        """One ListObjectsV2 page in botocore's shape, parsed here when the GET is ours."""
        names = {
            "Prefix": "prefix",
            "MaxKeys": "max-keys",
            "Delimiter": "delimiter",
            "ContinuationToken": "continuation-token",
        }
        query = {"list-type": "2", "encoding-type": "url"}
        query.update((names[k], str(v)) for k, v in params.items())

        async def run(client: Any) -> Mapping[str, Any]:
            response = await self._signed_get(client, "", query)
            if response is None:
                page: Mapping[str, Any] = await client.list_objects_v2(Bucket=self.bucket, **params)
                return page
            raw = response.raw
            try:
                body: bytes = await raw.read()
            finally:
                raw.release()
            if response.status_code != 200:
                raise _client_error(response.status_code, body, "ListObjectsV2")
            parsed = _parse_listing(body)
            if parsed is None:
                # an error document with status 200, or a cut-off answer: botocore calls
                # both a 500, to be retried; never an empty (complete-looking) listing
                raise _client_error(500, body, "ListObjectsV2")
            return parsed

        return await self._call(f"list {prefix!r}", run)

    def _entries(self, page: Mapping[str, Any], prefix: str, prove: bool = False) -> list[Entry]:
        """The objects of a listing page; ``prove``: remember revision links it proves."""
        entries = []
        for item in page.get("Contents") or ():
            key = item["Key"]
            # SeaweedFS answers with "dir/" markers for empty directories
            if key.endswith("/") or not key.startswith(prefix):
                continue
            modified = item.get("LastModified")
            relative = self._relative(key)
            entries.append(
                Entry(
                    relative,
                    item.get("Size"),
                    modified.timestamp() if modified is not None else None,
                )
            )
            if prove and _proven_link(key, item):
                head, tail = relative[:-_LINK_TAIL], relative[-_LINK_TAIL:-5]
                self._proven.setdefault(head, set()).add(bytes.fromhex(tail))
        return entries

    # -- Storage interface ------------------------------------------------------------

    async def probe(self) -> None:
        """HeadBucket, then at least one object below the v2 root."""
        where = f"at {self.endpoint}"
        try:
            answer = await self._op("HeadBucket", "head_bucket")
            self._measure_clock(answer)
        except S3Error as exc:
            if exc.status == 404 or exc.code in ("NoSuchBucket", "NotFound", "404"):
                raise StorageError(f"bucket {self.bucket!r} does not exist {where}") from exc
            if exc.status in (401, 403):
                raise StorageError(
                    f"access to bucket {self.bucket!r} {where} denied "
                    f"(check accesskey/secretkey and the bucket policy): {exc}"
                ) from exc
            raise StorageError(f"bucket {self.bucket!r} {where} is not usable: {exc}") from exc
        page = await self._op("probe listing", "list_objects_v2", Prefix=self.prefix, MaxKeys=10)
        if not self._entries(page, self.prefix):
            raise StorageError(
                f"bucket {self.bucket!r} {where} has no registry data: no object below "
                f"{self.prefix!r} (check rootdirectory {self.settings.rootdirectory!r})"
            )

    def _measure_clock(self, answer: Mapping[str, Any]) -> None:
        """Note the store's clock from an answer's Date header. Date is whole seconds and was
        stamped before the answer arrived: the store's time is never overestimated."""
        headers = (answer.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}
        try:
            date = email.utils.parsedate_to_datetime(headers.get("date", ""))
        except (TypeError, ValueError):
            return
        if date.tzinfo is not None:
            self._store_clock = (date.timestamp(), time.monotonic())

    def clock(self) -> float | None:
        """The store's time now, from the Date of the last probe's HeadBucket: S3 stamps
        LastModified with its own clock, which need not agree with this host's."""
        if self._store_clock is None:
            return None
        stamped, at = self._store_clock
        return stamped + (time.monotonic() - at)

    async def list_blob_shard(self, shard: str) -> list[BlobEntry]:
        """One flat listing of ``blobs/sha256/<shard>/``; size and mtime come from it."""
        if len(shard) != 2 or any(c not in "0123456789abcdef" for c in shard):
            raise ValueError(f"not a blob shard: {shard!r}")
        prefix = self._key(f"{layout.BLOBS}{shard}/")
        found: list[BlobEntry] = []
        async for page in self._pages(prefix):
            for entry in self._entries(page, prefix):
                rest = self._key(entry.key)[len(prefix) :]
                hexdigest, _, tail = rest.partition("/")
                if tail == "data" and layout.is_hex(hexdigest) and hexdigest.startswith(shard):
                    found.append(BlobEntry(hexdigest, entry.size, entry.mtime))
        return found

    async def walk(self, prefix: str) -> AsyncIterator[list[Entry]]:
        """Every object below ``prefix``: flat listings of its subtrees, run concurrently."""
        async for batch in self._walk(prefix, prove=False, layers=None):
            yield batch

    async def scan_repositories(self, layers: bool = True) -> AsyncIterator[list[str]]:
        """Keys under repositories/, each section of each repository a flat listing of its own
        (without ``layers``, ``_layers/`` is named, not listed). The listing's ETags prove most
        revision links' content, so that the mark reads them from memory instead of one GET
        each (half its requests)."""
        self._proven.clear()
        async for batch in self._walk(layout.REPOSITORIES, prove=True, layers=layers):
            yield [entry.key for entry in batch]

    async def read_many(self, keys: Sequence[str], limit: int) -> list[bytes | None]:
        """``read`` of each key, concurrently; revision links the scan proved need no GET.

        A proven link is used once: a second read, or one after the next scan, asks S3."""
        out: list[bytes | None] = [None] * len(keys)
        fetch: list[int] = []
        for i, key in enumerate(keys):
            head, tail = key[:-_LINK_TAIL], key[-_LINK_TAIL:]
            proven = self._proven.get(head) if limit >= _LINK_SIZE else None
            if proven and tail.endswith("/link") and layout.is_hex(tail[:-5]):
                raw = bytes.fromhex(tail[:-5])
                if raw in proven:
                    proven.discard(raw)
                    if not proven:
                        del self._proven[head]  # an emptied set keeps its table (4 MB at 500k)
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
                    if entries:
                        await queue.put(entries)

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
                for common in page.get("CommonPrefixes") or ():
                    child = self._relative(common["Prefix"])
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
            await queue.put(_first_error(exc))
            return
        await queue.put(None)

    async def list_dir(self, prefix: str) -> tuple[list[str], list[str]]:
        """Delimiter listing: (file names, directory names) one level below ``prefix``."""
        full = self._key(_dir(prefix))
        files: list[str] = []
        dirs: list[str] = []
        async for page in self._pages(full, delimiter="/"):
            files.extend(entry.key.rsplit("/", 1)[-1] for entry in self._entries(page, full))
            for common in page.get("CommonPrefixes") or ():
                name = common["Prefix"][len(full) :].rstrip("/")
                if name:
                    dirs.append(name)
        return files, dirs

    async def stat(self, key: str) -> Entry | None:
        """HeadObject; None when the key does not exist."""
        try:
            head = await self._op(f"stat {key!r}", "head_object", Key=self._key(key))
        except S3Error as exc:
            if exc.status == 404 and exc.code in _MISSING_CODES:
                return None
            raise
        modified = head.get("LastModified")
        return Entry(
            key,
            head.get("ContentLength"),
            modified.timestamp() if modified is not None else None,
        )

    async def _signed_get(
        self, client: Any, full: str, query: Mapping[str, str] | None = None
    ) -> Any:
        """GET of the key ``full`` (the bucket itself when empty) with ``query``, signed here
        and sent through the client's own HTTP session (its pool, TLS and proxy settings).

        botocore's per-call pipeline (events, endpoint rules, a model-driven parse) cost three
        times the CPU of the request itself, and a check is thousands of GETs and listings.
        None when this client offers no HTTP session to send through."""
        http = getattr(getattr(client, "_endpoint", None), "http_session", None)
        if http is None or self._session is None:
            return None
        if self._route is None:
            # the client's own URL for a key (path or virtual-host style, endpoint rules)
            probe = "registry-pruned-route-probe"
            url = urlsplit(
                await client.generate_presigned_url(
                    "get_object", Params={"Bucket": self.bucket, "Key": probe}, ExpiresIn=60
                )
            )
            if not url.path.endswith("/" + probe):
                return None
            credentials: Any = (
                AioCredentials(self.s3.accesskey, self.s3.secretkey)
                if self.s3.accesskey and self.s3.secretkey
                else await self._session.get_credentials()
            )
            if credentials is None:
                return None
            base = f"{url.scheme}://{url.netloc}{url.path[: -len(probe)]}"
            self._route = (base, credentials)
        base, credentials = self._route
        url = base + quote(full, safe="/~")
        if not full and urlsplit(base).path != "/":
            url = url[:-1]  # path style: the bucket is /<bucket>, as botocore sends it
        if query:
            # encoded the way SigV4's canonical query string expects (only -_.~ left as is)
            url += "?" + "&".join(f"{k}={quote(v, safe='-_.~')}" for k, v in query.items())
        request = AWSRequest("GET", url)
        frozen = await credentials.get_frozen_credentials()
        S3SigV4Auth(frozen, "s3", self.s3.region).add_auth(request)
        prepared = request.prepare()
        prepared.stream_output = True  # the length is checked before the body is read
        return await http.send(prepared)

    async def read(self, key: str, limit: int) -> bytes:
        """GetObject; TooLarge before downloading when ContentLength exceeds ``limit``."""
        full = self._key(key)

        def too_large(length: int) -> TooLarge:
            return TooLarge(f"{self.description}: {key} has {length} bytes (limit {limit})")

        async def fetch(client: Any) -> bytes:
            response = await self._signed_get(client, full)
            if response is not None:
                raw = response.raw
                try:
                    if response.status_code != 200:
                        raise _client_error(response.status_code, await raw.read(), "GetObject")
                    length = response.headers.get("content-length")
                    if length is not None and int(length) > limit:
                        raise too_large(int(length))
                    data: bytes = await raw.read()
                finally:
                    raw.release()
                if len(data) > limit:
                    raise too_large(len(data))
                return data
            answer = await client.get_object(Bucket=self.bucket, Key=full)
            async with answer["Body"] as body:
                length = answer.get("ContentLength")
                if length is not None and length > limit:
                    raise too_large(length)
                data = await body.read()
            if len(data) > limit:
                raise TooLarge(f"{self.description}: {key} has over {limit} bytes")
            return data

        try:
            return await self._call(f"read {key!r}", fetch)
        except S3Error as exc:
            if exc.status == 404 and exc.code in _MISSING_CODES:
                raise NotFound(f"{self.description}: {key} does not exist") from exc
            raise

    async def write(self, key: str, data: bytes) -> None:
        """PutObject (atomic on S3)."""
        await self._op(f"write {key!r}", "put_object", Key=self._key(key), Body=data)

    #: CopyObject refuses sources over 5 GiB: larger ones are copied in parts
    copy_limit: int = 5 * 1024**3
    #: the parts of such a copy (S3: 5 MiB to 5 GiB each, at most 10,000 of them)
    copy_part_size: int = 512 * 1024**2

    async def move(self, src: str, dst: str) -> bool:
        """Copy then delete: S3 has no rename (online deletes park blobs this way). Objects
        over ``copy_limit`` are copied with UploadPartCopy, the rest with CopyObject."""
        entry = await self.stat(src)
        if entry is None:
            return False
        source = {"Bucket": self.bucket, "Key": self._key(src)}
        try:
            if entry.size is not None and entry.size > self.copy_limit:
                await self._copy_in_parts(src, dst, entry.size)
            else:
                await self._op(
                    f"move {src!r}", "copy_object", Key=self._key(dst), CopySource=source
                )
        except S3Error as exc:
            if exc.status == 404 and exc.code in _MISSING_CODES:
                return False
            raise
        failures = await self.delete_keys([src])
        if failures:
            raise StorageError(f"moved {src!r} but cannot remove it: {failures[0].reason}")
        return True

    async def _copy_in_parts(self, src: str, dst: str, size: int) -> None:
        """A multipart upload of ``dst`` whose parts are server-side copies of ranges of
        ``src`` (UploadPartCopy); aborted, leaving no parts behind, when any part fails."""
        key = self._key(dst)
        source = {"Bucket": self.bucket, "Key": self._key(src)}
        part = max(self.copy_part_size, -(-size // 10_000))
        started = await self._op(f"copy {src!r} in parts", "create_multipart_upload", Key=key)
        upload = started["UploadId"]

        async def copy_part(number: int, first: int) -> dict[str, Any]:
            last = min(first + part, size) - 1
            answer = await self._op(
                f"copy part {number} of {src!r}",
                "upload_part_copy",
                Key=key,
                UploadId=upload,
                PartNumber=number,
                CopySource=source,
                CopySourceRange=f"bytes={first}-{last}",
            )
            return {"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]}

        try:
            # a failed part cancels the others: the upload is aborted at once
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(copy_part(n, first))
                    for n, first in enumerate(range(0, size, part), 1)
                ]
            parts = [task.result() for task in tasks]
            await self._op(
                f"complete the copy of {src!r}",
                "complete_multipart_upload",
                Key=key,
                UploadId=upload,
                MultipartUpload={"Parts": parts},
            )
        except BaseException as exc:
            with contextlib.suppress(StorageError):
                await self._op(
                    f"abort the copy of {src!r}", "abort_multipart_upload", Key=key, UploadId=upload
                )
            if isinstance(exc, BaseExceptionGroup):
                raise _first_error(exc) from None
            raise

    async def conditional_writes(self) -> bool:
        """Whether the store honours If-None-Match and If-Match on PutObject (AWS since 2024,
        SeaweedFS 4.x: yes; older MinIO and Ceph RGW may ignore them): asked once, on a
        probe object, by writes that must be refused."""
        if self._conditional is None:
            key = "_registry-pruned/conditional-write-probe"
            await self.write(key, b"probe")
            honoured = True
            for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"0123456789abcdef"'}):
                try:
                    await self._op(
                        "conditional write probe",
                        "put_object",
                        Key=self._key(key),
                        Body=b"must be refused",
                        **condition,
                    )
                    honoured = False  # written although the condition did not hold
                except S3Error as exc:
                    if exc.status != 412:
                        honoured = False  # NotImplemented, or an unknown header refused
            await self.delete_keys([key])
            self._conditional = honoured
            if not honoured:
                self._log.warning("s3 store ignores conditional writes: lease by write-and-settle")
        return self._conditional

    async def read_versioned(self, key: str, limit: int) -> tuple[bytes, str]:
        """GetObject: the content and its ETag."""
        try:
            answer = await self._op(f"read {key!r}", "get_object", Key=self._key(key))
        except S3Error as exc:
            if exc.status == 404 and exc.code in _MISSING_CODES:
                raise NotFound(f"{self.description}: {key} does not exist") from exc
            raise
        async with answer["Body"] as body:
            data: bytes = await body.read(limit + 1)
        if len(data) > limit:
            raise TooLarge(f"{self.description}: {key} has over {limit} bytes")
        return data, str(answer.get("ETag") or "")

    async def write_if(self, key: str, data: bytes, version: str | None) -> str:
        """PutObject with If-None-Match: * (create) or If-Match: <ETag> (replace)."""
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            answer = await self._op(
                f"write {key!r} if unchanged",
                "put_object",
                Key=self._key(key),
                Body=data,
                **condition,
            )
        except S3Error as exc:
            # 412: the condition did not hold; 409: a concurrent conditional write won
            if exc.status in (409, 412):
                raise Conflict(f"{self.description}: {key} changed: not written") from exc
            raise
        return str(answer.get("ETag") or "")

    async def delete_blobs(self, hexes: Sequence[str]) -> list[DeleteFailure]:
        """Delete ``blobs/sha256/<xx>/<hex>/data``; S3 has no directory left to remove."""
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
        """DeleteObjects (Quiet), at most 1000 keys a request and several requests in flight;
        per-key errors become DeleteFailures."""
        failures: list[DeleteFailure] = []
        wanted: list[str] = []
        for key in dict.fromkeys(keys):
            if not key or key.endswith("/") or key.startswith("/"):
                failures.append(DeleteFailure(key, "not an object key"))
            else:
                wanted.append(key)
        streams = min(_DELETE_STREAMS, self.concurrency)
        size = min(BATCH, max(_DELETE_MIN, -(-len(wanted) // streams)))
        batches = [wanted[i : i + size] for i in range(0, len(wanted), size)]
        for result in await asyncio.gather(*(self._delete_batch(b) for b in batches)):
            failures.extend(result)
        return failures

    async def _delete_batch(self, keys: list[str]) -> list[DeleteFailure]:
        failed: dict[str, str] = {}
        pending = keys
        for attempt in range(1, self.retry.attempts + 1):
            delete = {"Objects": [{"Key": self._key(k)} for k in pending], "Quiet": True}
            try:
                answer = await self._op(
                    f"delete {len(pending)} keys", "delete_objects", Delete=delete
                )
            except StorageError as exc:
                self._log.warning("s3 delete batch failed", keys=len(pending), error=str(exc))
                failed.update((k, str(exc)) for k in pending)
                break
            asked = set(pending)
            again: list[str] = []
            for error in answer.get("Errors") or ():
                key = self._relative(str(error.get("Key", "")))
                if key not in asked:
                    continue
                code = str(error.get("Code") or "")
                if code in _RETRY_CODES and attempt < self.retry.attempts:
                    again.append(key)
                else:
                    failed[key] = f"{code or 'error'}: {error.get('Message') or 'no message'}"
            if not again:
                break
            pending = again
            await asyncio.sleep(self.retry.delay(attempt, self._rng))
        if failed:
            self._log.warning("s3 keys not deleted", failed=len(failed), of=len(keys))
        return [DeleteFailure(k, reason) for k, reason in failed.items()]

    async def delete_trees(self, prefixes: Sequence[str]) -> list[DeleteFailure]:
        """Everything below each prefix, in shared DeleteObjects batches. Trees are listed
        concurrently, except layer link directories: their one key, ``link``, is deleted
        without a listing (one request per orphan's link would bound the delete rate)."""
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
            listed, await asyncio.gather(*(below(p) for p in listed)), strict=True
        ):
            owner.update(dict.fromkeys(found, prefix))
        return _by_prefix(await self.delete_keys(list(owner)), owner)

    async def delete_tree(self, prefix: str) -> list[DeleteFailure]:
        """List everything below ``prefix`` and delete it in DeleteObjects batches."""
        return await self.delete_trees([prefix])


def _by_prefix(failures: list[DeleteFailure], owner: Mapping[str, str]) -> list[DeleteFailure]:
    """One failure per prefix not wholly deleted, named by that prefix."""
    out: dict[str, DeleteFailure] = {}
    for failure in failures:
        prefix = owner.get(failure.key, failure.key)
        out.setdefault(prefix, DeleteFailure(prefix, failure.reason))
    return list(out.values())


def _dir(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _first_error(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (TaskGroup wraps what the listings raised)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def create(
    settings: StorageSettings,
    concurrency: int,
    log: structlog.typing.FilteringBoundLogger | None = None,
) -> S3Storage:
    """The S3 driver for ``settings`` with ``concurrency`` requests in flight at most."""
    return S3Storage(settings, concurrency, log=log)
