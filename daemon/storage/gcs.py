"""Google Cloud Storage driver on gcloud-aio-storage: GCS's calls under the shared
object-store layer (JSON listings with fields, JSON batch deletes, rewrite copies)."""

from __future__ import annotations

import base64
import io
import re
import ssl
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from gcloud.aio.auth import Token
from gcloud.aio.storage import Storage as GoogleStorage

from daemon.storage.base import StorageError
from daemon.storage.objectstore import BatchRefused, KeyFailure, Kind, Listed, ObjectStore, Page

#: the JSON API's batch limit
BATCH = 100
_PAGE = 1000
_SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]
_API = "https://storage.googleapis.com"
#: only what the driver reads: listings are most of a check's bytes
_LIST_FIELDS = "items(name,size,updated,md5Hash),prefixes,nextPageToken"
_PART_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")
_PART_ID = re.compile(rb"(?im)^content-id:\s*<?response-(\d+)>?")


def classify(exc: BaseException) -> tuple[Kind, str, int] | None:
    """GCS's answer (or its absence) as the layer's kinds."""
    if isinstance(exc, aiohttp.ClientResponseError):
        status = exc.status
        if status == 429 or status >= 500 or status == 408:
            return Kind.TRANSIENT, str(status), status
        if status == 404:
            return Kind.MISSING, "404", status
        if status in (409, 412):
            return Kind.CONFLICT, str(status), status
        if status in (401, 403):
            return Kind.DENIED, str(status), status
        return Kind.FATAL, str(status), status
    if isinstance(exc, ssl.SSLError | aiohttp.ClientSSLError):
        return Kind.FATAL, "", 0
    if isinstance(exc, aiohttp.ClientError | ConnectionError | TimeoutError):
        return Kind.TRANSIENT, "", 0
    return None


def _epoch(rfc3339: str | None) -> float | None:
    return datetime.fromisoformat(rfc3339).timestamp() if rfc3339 else None


def _md5(value: str | None) -> str:
    return base64.b64decode(value).hex() if value else ""


def _raise(status: int, reason: str, body: str, request: Any) -> None:
    raise aiohttp.ClientResponseError(
        request.request_info, request.history, status=status, message=f"{reason}: {body}"
    )


class GCSStorage(ObjectStore):
    """A registry store in a GCS bucket below ``<rootdirectory>/docker/registry/v2/``."""

    batch_max = BATCH
    bogus_version = "1"
    credentials_hint = "keyfile/credentials and the service account's bucket roles"
    driver = "gcs"

    # the service's client, made by _connect
    _http: aiohttp.ClientSession | None = None
    _token: Token | None = None
    _client: GoogleStorage | None = None

    def _locate(self) -> tuple[str, str]:
        assert self.settings.gcs is not None
        self.gcs = self.settings.gcs
        self.api = self.gcs.emulator or _API
        return self.gcs.bucket, self.api

    async def _connect(self) -> None:
        timeout = aiohttp.ClientTimeout(
            sock_connect=self.retry.connect_timeout, sock_read=self.retry.read_timeout
        )
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.concurrency), timeout=timeout
        )
        token: Token | None = None
        if self.gcs.emulator is None:
            service: Any = self.gcs.keyfile
            if self.gcs.credentials is not None:
                service = io.StringIO(self.gcs.credentials)
            try:
                # keyfile, inline credentials, else Application Default Credentials
                token = Token(service_file=service, session=http, scopes=_SCOPES)
            except (ValueError, KeyError, OSError) as exc:
                await http.close()
                raise StorageError(f"{self.description}: unusable credentials: {exc}") from exc
        self._http, self._token = http, token
        self._client = GoogleStorage(
            token=token, session=http, api_root=self.api, api_is_dev=self.gcs.emulator is not None
        )

    async def _disconnect(self) -> None:
        http, self._http, self._client, self._token = self._http, None, None, None
        if http is not None:
            await http.close()

    def _google(self) -> GoogleStorage:
        assert self._client is not None, "opened by _call"
        return self._client

    async def _headers(self) -> dict[str, str]:
        if self._token is None:
            return {}
        return {"Authorization": f"Bearer {await self._token.get()}"}

    def _classify(self, exc: BaseException) -> tuple[Kind, str, int] | None:
        return classify(exc)

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, aiohttp.ClientResponseError):
            message = " ".join(exc.message.split())[:300] or "no message"
            return f"HTTP {exc.status}: {message}"
        return f"{type(exc).__name__}: {exc}"

    # -- GCS's calls ---------------------------------------------------------------------

    async def _check_container(self) -> float | None:
        await self._google().get_bucket_metadata(
            self.gcs.bucket, timeout=int(self.retry.read_timeout)
        )
        return None  # the client gives no answer's Date: this host's clock is used

    async def _list_page(self, prefix: str, delimiter: str | None, token: str | None) -> Page:
        params = {"prefix": prefix, "maxResults": str(_PAGE), "fields": _LIST_FIELDS}
        if delimiter:
            params["delimiter"] = delimiter
        if token:
            params["pageToken"] = token
        answer = await self._google().list_objects(
            self.gcs.bucket, params=params, timeout=int(self.retry.read_timeout)
        )
        if not isinstance(answer, dict):
            raise StorageError(f"{self.description}: listing of {prefix!r} is not a JSON object")
        objects: list[Listed] = [
            (
                item["name"],
                int(item["size"]) if "size" in item else None,
                _epoch(item.get("updated")),
                _md5(item.get("md5Hash")),
            )
            for item in answer.get("items") or ()
        ]
        return Page(objects, list(answer.get("prefixes") or ()), answer.get("nextPageToken"))

    async def _get(self, key: str, limit: int) -> bytes:
        return (await self._download(key, limit))[0]

    async def _get_versioned(self, key: str, limit: int) -> tuple[bytes, str]:
        return await self._download(key, limit)

    async def _download(self, key: str, limit: int) -> tuple[bytes, str]:
        """Content and generation."""
        stream = await self._google().download_stream(
            self.gcs.bucket, key, timeout=int(self.retry.read_timeout)
        )
        async with stream as response:
            length = response.headers.get("content-length")
            if length is not None and int(length) > limit:
                raise self._too_large(key, int(length), limit)
            generation = response.headers.get("x-goog-generation") or ""
            data = bytearray()
            # one read answers what has arrived: read on to the end or past the limit
            while len(data) <= limit:
                chunk = await response.content.read(limit + 1 - len(data))
                if not chunk:
                    break
                data += chunk
        if len(data) > limit:
            raise self._too_large(key, len(data), limit)
        return bytes(data), generation

    async def _put_if(self, key: str, data: bytes, version: str | None) -> str:
        """An upload with ifGenerationMatch: 0 (create) or the generation read (replace)."""
        answer = await self._google().upload(
            self.gcs.bucket,
            key,
            data,
            content_type="application/octet-stream",
            parameters={"ifGenerationMatch": "0" if version is None else version},
            force_resumable_upload=False,
            timeout=int(self.retry.read_timeout),
        )
        return str(answer.get("generation") or "")

    async def _put(self, key: str, data: bytes) -> None:
        await self._google().upload(
            self.gcs.bucket,
            key,
            data,
            content_type="application/octet-stream",
            force_resumable_upload=False,
            timeout=int(self.retry.read_timeout),
        )

    async def _head(self, key: str) -> tuple[int | None, float | None]:
        meta = await self._google().download_metadata(
            self.gcs.bucket, key, timeout=int(self.retry.read_timeout)
        )
        size = meta.get("size")
        return (int(size) if size is not None else None), _epoch(meta.get("updated"))

    async def _copy(self, src: str, dst: str) -> None:
        # objects.rewrite: any size, the service copies in steps that copy() follows
        answer = await self._google().copy(
            self.gcs.bucket,
            src,
            self.gcs.bucket,
            new_name=dst,
            timeout=int(self.retry.read_timeout),
        )
        if not answer.get("done", True) and not answer.get("resource"):
            raise StorageError(f"{self.description}: copy of {src!r} did not finish")

    async def _delete_batch(self, keys: list[str]) -> list[KeyFailure]:
        """One JSON API batch of objects.delete calls (multipart/mixed)."""
        boundary = "registry-pruned-batch"
        base = f"/storage/v1/b/{quote(self.gcs.bucket, safe='')}/o/"
        host = urlsplit(self.api).netloc
        parts = [
            f"--{boundary}\r\nContent-Type: application/http\r\n"
            f"Content-Transfer-Encoding: binary\r\nContent-ID: <{i}>\r\n\r\n"
            f"DELETE {base}{quote(key, safe='')} HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Length: 0\r\n\r\n\r\n"
            for i, key in enumerate(keys)
        ]
        body = ("".join(parts) + f"--{boundary}--\r\n").encode()
        headers = await self._headers()
        headers["Content-Type"] = f"multipart/mixed; boundary={boundary}"
        assert self._http is not None
        async with self._http.post(
            f"{self.api}/batch/storage/v1", data=body, headers=headers
        ) as response:
            text = await response.read()
            if response.status in (400, 404, 405, 501):
                raise BatchRefused(f"HTTP {response.status}: {text[:200]!r}")
            if response.status >= 300:
                _raise(
                    response.status, response.reason or "", text.decode(errors="replace"), response
                )
            kind = response.headers.get("Content-Type", "")
        return _batch_failures(keys, kind, text)

    async def _delete_one(self, key: str) -> None:
        await self._google().delete(self.gcs.bucket, key, timeout=int(self.retry.read_timeout))


def _batch_failures(keys: list[str], content_type: str, body: bytes) -> list[KeyFailure]:
    """The keys whose part of a batch answer is neither 2xx nor 404 (a missing key is
    deleted); a key without a part failed too (transiently: it is asked again)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        raise aiohttp.ClientPayloadError(f"batch answer without a boundary: {content_type!r}")
    answered: dict[int, int] = {}
    for part in body.split(b"--" + match.group(1).encode()):
        status, ident = _PART_STATUS.search(part), _PART_ID.search(part)
        if status is not None and ident is not None:
            answered[int(ident.group(1))] = int(status.group(1))
    out: list[KeyFailure] = []
    for i, key in enumerate(keys):
        status = answered.get(i)
        if status is None:
            out.append(KeyFailure(key, "no answer in the batch", True))
        elif status >= 300 and status != 404:
            transient = status == 429 or status >= 500
            out.append(KeyFailure(key, f"HTTP {status}", transient))
    return out
