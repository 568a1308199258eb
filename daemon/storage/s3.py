"""S3 driver on aiobotocore: S3's calls under the shared object-store layer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import hmac
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote_plus, urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.credentials import AioCredentials
from aiobotocore.session import AioSession, get_session
from botocore.awsrequest import AWSPreparedRequest
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.utils import parse_timestamp

from daemon.storage.base import StorageError
from daemon.storage.objectstore import (
    KeyFailure,
    Kind,
    Listed,
    ObjectStore,
    Page,
    RetryPolicy,
    first_error,
    listing_query,
)

__all__ = ["BATCH", "RetryPolicy", "S3Storage", "create", "is_transient"]

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
_LIST_QUERY = {"list-type": "2", "encoding-type": "url", "max-keys": str(BATCH)}


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


def _etag_md5(etag: str) -> str:
    """The content's MD5 where the ETag is one (a single-part PUT); "" otherwise."""
    etag = etag.strip('"')
    return etag if len(etag) == 32 else ""


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


def _parse_listing(body: bytes) -> Page | None:
    """A ListObjectsV2 answer -> a Page; None unless it is a complete ListBucketResult."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    if _local(root.tag) != "ListBucketResult":
        return None
    objects: list[Listed] = []
    prefixes: list[str] = []
    truncated = False
    token: str | None = None
    encoded = False
    for node in root:
        tag = _local(node.tag)
        if tag == "Contents":
            key, size, mtime, etag = "", None, None, ""
            for child in node:
                name, text = _local(child.tag), child.text or ""
                if name == "Key":
                    key = text
                elif name == "Size":
                    size = int(text)
                elif name == "LastModified":
                    mtime = _timestamp(text).timestamp()
                elif name == "ETag":
                    etag = _etag_md5(text)
            objects.append((key, size, mtime, etag))
        elif tag == "CommonPrefixes":
            prefixes.append(node.findtext("{*}Prefix") or "")
        elif tag == "IsTruncated":
            truncated = (node.text or "").strip().lower() == "true"
        elif tag == "NextContinuationToken":
            token = node.text or ""
        elif tag == "EncodingType":
            encoded = (node.text or "") == "url"
    if encoded:
        # asked for: keys are URL-encoded so that any byte survives XML (botocore decodes too)
        objects = [(unquote_plus(k), s, m, e) for k, s, m, e in objects]
        prefixes = [unquote_plus(p) for p in prefixes]
    return Page(objects, prefixes, (token or "") if truncated else None)


def _botocore_page(answer: Mapping[str, Any]) -> Page:
    """botocore's ListObjectsV2 parse -> a Page."""
    objects: list[Listed] = []
    for item in answer.get("Contents") or ():
        modified = item.get("LastModified")
        objects.append(
            (
                item["Key"],
                item.get("Size"),
                modified.timestamp() if modified is not None else None,
                _etag_md5(str(item.get("ETag") or "")),
            )
        )
    prefixes = [common["Prefix"] for common in answer.get("CommonPrefixes") or ()]
    token = str(answer.get("NextContinuationToken") or "") if answer.get("IsTruncated") else None
    return Page(objects, prefixes, token)


#: x-amz-content-sha256 of a GET: the SHA-256 of its empty body
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class GetSigner:
    """SigV4 headers for a GET without a body, as botocore's S3SigV4Auth computes them.

    Its per-request pipeline (a header map, the URL split three times, the signing key derived
    anew) was a quarter of a check's client CPU in profiles, over thousands of GETs and
    listings. Here the host is taken once and the signing key once a day per secret."""

    def __init__(self, region: str, base_url: str) -> None:
        """``base_url``: the bucket's root, as the client addresses it."""
        self.region = region
        parts = urlsplit(base_url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.base_path = parts.path
        # the Host header as sent (botocore's _host_from_url): no default port, no userinfo
        host = parts.hostname or ""
        self.host = f"[{host}]" if ":" in host else host
        if parts.port is not None and parts.port != {"http": 80, "https": 443}.get(parts.scheme):
            self.host += f":{parts.port}"
        self._key: tuple[str, str, bytes] | None = None  # (day, secret, signing key)

    def _signing_key(self, day: str, secret: str) -> bytes:
        cached = self._key
        if cached is not None and cached[0] == day and cached[1] == secret:
            return cached[2]
        key = f"AWS4{secret}".encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        self._key = (day, secret, key)
        return key

    def headers(self, path: str, query: str, credentials: Any, now: float) -> dict[str, str]:
        """The request's headers: ``path`` as sent (quoted), ``query`` as sent (encoded)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        headers = {"X-Amz-Date": stamp, "X-Amz-Content-SHA256": _EMPTY_SHA256}
        if credentials.token:
            headers["X-Amz-Security-Token"] = credentials.token
        signed = sorted([("host", self.host), *((k.lower(), v) for k, v in headers.items())])
        names = ";".join(name for name, _ in signed)
        pairs = sorted(pair.partition("=")[::2] for pair in query.split("&")) if query else []
        canonical = "\n".join(
            [
                "GET",
                path,
                "&".join(f"{k}={v}" for k, v in pairs),
                *(f"{name}:{' '.join(value.split())}" for name, value in signed),
                "",
                names,
                _EMPTY_SHA256,
            ]
        )
        day = stamp[:8]
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n"
        to_sign += hashlib.sha256(canonical.encode()).hexdigest()
        key = self._signing_key(day, credentials.secret_key)
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={names}, Signature={signature}"
        )
        return headers


def _endpoint_url(regionendpoint: str | None, secure: bool) -> str | None:
    if not regionendpoint:
        return None
    if "://" in regionendpoint:
        return regionendpoint.rstrip("/")
    scheme = "https" if secure else "http"
    return f"{scheme}://{regionendpoint.rstrip('/')}"


class S3Storage(ObjectStore):
    """A registry store in an S3 bucket below ``<rootdirectory>/docker/registry/v2/``."""

    batch_max = BATCH
    #: CopyObject refuses sources over 5 GiB: larger ones are copied in parts
    copy_limit: float = 5 * 1024**3
    #: the parts of such a copy (S3: 5 MiB to 5 GiB each, at most 10,000 of them)
    copy_part_size: int = 512 * 1024**2
    credentials_hint = "accesskey/secretkey and the bucket policy"
    driver = "s3"

    # the service's client, made by _connect
    _stack: AsyncExitStack | None = None
    _client: Any = None
    _session: AioSession | None = None
    #: (URL of the bucket's root with a trailing "/", credentials, signer) for signed GETs
    _route: tuple[str, Any, GetSigner] | None = None

    def _locate(self) -> tuple[str, str]:
        assert self.settings.s3 is not None
        self.s3 = self.settings.s3
        self.bucket = self.s3.bucket
        self.endpoint_url = _endpoint_url(self.s3.regionendpoint, self.s3.secure)
        return self.bucket, self.endpoint_url or f"AWS S3 in {self.s3.region}"

    # -- client lifecycle -------------------------------------------------------------

    def _verify(self) -> bool | str | None:
        if self.s3.skipverify:
            return False
        scheme = urlsplit(self.endpoint_url).scheme if self.endpoint_url else "https"
        if scheme == "http" or (not self.endpoint_url and not self.s3.secure):
            # aiobotocore loads AWS_CA_BUNDLE even for plain http and fails if it is unusable
            return False
        return self.s3.ca_bundle or None

    async def _connect(self) -> None:
        config = AioConfig(
            region_name=self.s3.region,
            signature_version="s3v4",
            s3={"addressing_style": "path" if self.s3.forcepathstyle else "auto"},
            # one attempt per call: the layer's retry loop is the one that counts
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

    async def _disconnect(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        self._session, self._route = None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> S3Storage:
        await self.open()
        return self

    # -- errors -----------------------------------------------------------------------

    def _classify(self, exc: BaseException) -> tuple[Kind, str, int] | None:
        code, status = "", 0
        if isinstance(exc, ClientError):
            code, _, status = _client_error_parts(exc)
        if is_transient(exc):
            return Kind.TRANSIENT, code, status
        if status == 404 and code in _MISSING_CODES:
            return Kind.MISSING, code, status
        if status in (409, 412):
            # 412: a condition did not hold; 409: a concurrent conditional write won
            return Kind.CONFLICT, code, status
        if status in (401, 403):
            return Kind.DENIED, code, status
        return Kind.FATAL, code, status

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, ClientError):
            code, message, status = _client_error_parts(exc)
            return f"{code or 'error'}: {message or 'no message'} (HTTP {status})"
        return f"{type(exc).__name__}: {exc}"

    # -- S3's calls ---------------------------------------------------------------------

    async def _signed_get(self, full: str, query: Mapping[str, str] | None = None) -> Any:
        """GET of the key ``full`` (the bucket itself when empty) with ``query``, signed here
        and sent through the client's own HTTP session (its pool, TLS and proxy settings).

        botocore's per-call pipeline (events, endpoint rules, a model-driven parse) cost three
        times the CPU of the request itself, and a check is thousands of GETs and listings.
        None when this client offers no HTTP session to send through."""
        client = self._client
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
            self._route = (base, credentials, GetSigner(self.s3.region, base))
        _base, credentials, signer = self._route
        path = signer.base_path + quote(full, safe="/~")
        if not full and path != "/":
            path = path[:-1]  # path style: the bucket is /<bucket>, as botocore sends it
        url = signer.origin + path
        encoded = ""
        if query:
            # encoded the way SigV4's canonical query string expects (only -_.~ left as is)
            encoded = "&".join(f"{k}={quote(v, safe='-_.~')}" for k, v in query.items())
            url += "?" + encoded
        frozen = await credentials.get_frozen_credentials()
        headers = signer.headers(path, encoded, frozen, time.time())
        # stream_output: the length is checked before the body is read
        return await http.send(AWSPreparedRequest("GET", url, headers, None, True, {}))

    async def _check_container(self) -> float | None:
        answer = await self._client.head_bucket(Bucket=self.bucket)
        headers = (answer.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}
        try:
            date = email.utils.parsedate_to_datetime(headers.get("date", ""))
        except (TypeError, ValueError):
            return None
        return date.timestamp() if date.tzinfo is not None else None

    async def _list_page(self, prefix: str, delimiter: str | None, token: str | None) -> Page:
        """One ListObjectsV2 page, parsed here when the GET is ours."""
        names = ("prefix", "delimiter", "continuation-token")
        query = listing_query(names, prefix, delimiter, token, **_LIST_QUERY)
        response = await self._signed_get("", query)
        if response is None:
            params: dict[str, Any] = {"Prefix": prefix, "MaxKeys": BATCH}
            if delimiter:
                params["Delimiter"] = delimiter
            if token:
                params["ContinuationToken"] = token
            return _botocore_page(await self._client.list_objects_v2(Bucket=self.bucket, **params))
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

    async def _get(self, key: str, limit: int) -> bytes:
        """GetObject; TooLarge before downloading when ContentLength exceeds ``limit``."""
        response = await self._signed_get(key)
        if response is not None:
            raw = response.raw
            try:
                if response.status_code != 200:
                    raise _client_error(response.status_code, await raw.read(), "GetObject")
                length = response.headers.get("content-length")
                if length is not None and int(length) > limit:
                    raise self._too_large(key, int(length), limit)
                data: bytes = await raw.read()
            finally:
                raw.release()
            if len(data) > limit:
                raise self._too_large(key, len(data), limit)
            return data
        answer = await self._client.get_object(Bucket=self.bucket, Key=key)
        async with answer["Body"] as body:
            length = answer.get("ContentLength")
            if length is not None and length > limit:
                raise self._too_large(key, length, limit)
            data = await body.read()
        if len(data) > limit:
            raise self._too_large(key, len(data), limit)
        return data

    async def _put(self, key: str, data: bytes) -> None:
        await self._client.put_object(Bucket=self.bucket, Key=key, Body=data)

    async def _head(self, key: str) -> tuple[int | None, float | None]:
        head = await self._client.head_object(Bucket=self.bucket, Key=key)
        modified = head.get("LastModified")
        return head.get("ContentLength"), modified.timestamp() if modified is not None else None

    async def _copy(self, src: str, dst: str) -> None:
        source = {"Bucket": self.bucket, "Key": src}
        await self._client.copy_object(Bucket=self.bucket, Key=dst, CopySource=source)

    async def _op(self, what: str, operation: str, **params: Any) -> dict[str, Any]:
        """One client call on the bucket through the layer's retries."""
        call = getattr(self._client, operation)
        return await self._call(what, lambda: call(Bucket=self.bucket, **params))

    async def _copy_large(self, src: str, dst: str, size: int) -> None:
        """A multipart upload of ``dst`` whose parts are server-side copies of ranges of
        ``src`` (UploadPartCopy); aborted, leaving no parts behind, when any part fails."""
        source = {"Bucket": self.bucket, "Key": src}
        part = max(self.copy_part_size, -(-size // 10_000))
        started = await self._op(f"copy {src!r} in parts", "create_multipart_upload", Key=dst)
        upload = started["UploadId"]

        async def copy_part(number: int, first: int) -> dict[str, Any]:
            last = min(first + part, size) - 1
            answer = await self._op(
                f"copy part {number} of {src!r}",
                "upload_part_copy",
                Key=dst,
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
                Key=dst,
                UploadId=upload,
                MultipartUpload={"Parts": parts},
            )
        except BaseException as exc:
            with contextlib.suppress(StorageError):
                await self._op(
                    f"abort the copy of {src!r}", "abort_multipart_upload", Key=dst, UploadId=upload
                )
            if isinstance(exc, BaseExceptionGroup):
                raise first_error(exc) from None
            raise

    async def _get_versioned(self, key: str, limit: int) -> tuple[bytes, str]:
        """GetObject: the content and its ETag."""
        answer = await self._client.get_object(Bucket=self.bucket, Key=key)
        async with answer["Body"] as body:
            data: bytes = await body.read(limit + 1)
        if len(data) > limit:
            raise self._too_large(key, len(data), limit)
        return data, str(answer.get("ETag") or "")

    async def _put_if(self, key: str, data: bytes, version: str | None) -> str:
        """PutObject with If-None-Match: * (create) or If-Match: <ETag> (replace)."""
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        answer = await self._client.put_object(Bucket=self.bucket, Key=key, Body=data, **condition)
        return str(answer.get("ETag") or "")

    async def _delete_batch(self, keys: list[str]) -> list[KeyFailure]:
        """DeleteObjects (Quiet): its per-key errors."""
        delete = {"Objects": [{"Key": k} for k in keys], "Quiet": True}
        answer = await self._client.delete_objects(Bucket=self.bucket, Delete=delete)
        out: list[KeyFailure] = []
        for error in answer.get("Errors") or ():
            code = str(error.get("Code") or "")
            reason = f"{code or 'error'}: {error.get('Message') or 'no message'}"
            out.append(KeyFailure(str(error.get("Key", "")), reason, code in _RETRY_CODES))
        return out

    async def _delete_one(self, key: str) -> None:
        await self._client.delete_object(Bucket=self.bucket, Key=key)


#: the S3 driver for settings, with at most ``concurrency`` requests in flight
create = S3Storage
