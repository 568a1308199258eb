"""Azure Blob driver on azure-storage-blob's asyncio client: Azure's calls under the shared
object-store layer (listing pages, Blob Batch deletes, server-side copy)."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import ssl
import uuid
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import urlencode

import aiohttp
from azure.core import MatchConditions
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline import PipelineRequest
from azure.core.rest import HttpRequest
from azure.storage.blob.aio import BlobPrefix, BlobServiceClient, ContainerClient

from daemon.config import AzureSettings
from daemon.storage.base import StorageError
from daemon.storage.objectstore import (
    BatchRefused,
    KeyFailure,
    Kind,
    Listed,
    ObjectStore,
    Page,
    listing_query,
)

#: Blob Batch's limit of subrequests in one batch
BATCH = 256
#: List Blobs' largest page
_PAGE = 5000
_LIST_QUERY = {"restype": "container", "comp": "list", "maxresults": str(_PAGE)}
_RETRY_CODES = frozenset({"ServerBusy", "InternalError", "OperationTimedOut", "ServerTimeout"})
_MISSING_CODES = frozenset({"BlobNotFound", "ResourceNotFound", "ContainerNotFound", ""})
#: copies the service finishes later are polled this often, this many times
_COPY_POLL = 0.2
_COPY_POLLS = 3000


def _status(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, HttpResponseError):
        code = exc.error_code or ""
        return str(getattr(code, "value", code)), int(exc.status_code or 0)
    return "", 0


def classify(exc: BaseException) -> tuple[Kind, str, int] | None:
    """Azure's answer (or its absence) as the layer's kinds."""
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        inner = getattr(exc, "inner_exception", None)
        if isinstance(inner, ssl.SSLError | aiohttp.ClientSSLError):
            return Kind.FATAL, "", 0  # a certificate will not verify on a second attempt
        return Kind.TRANSIENT, "", 0
    if isinstance(exc, HttpResponseError):
        code, status = _status(exc)
        if status == 429 or status >= 500 or code in _RETRY_CODES:
            return Kind.TRANSIENT, code, status
        if status == 404 and code in _MISSING_CODES:
            return Kind.MISSING, code, status
        if status in (409, 412):
            # 412: ConditionNotMet; 409: BlobAlreadyExists for a create
            return Kind.CONFLICT, code, status
        if status in (401, 403) or isinstance(exc, ClientAuthenticationError):
            return Kind.DENIED, code, status
        return Kind.FATAL, code, status
    if isinstance(exc, ClientAuthenticationError):
        return Kind.DENIED, "", 0
    if isinstance(exc, aiohttp.ClientError | ConnectionError | TimeoutError):
        return Kind.TRANSIENT, "", 0
    return None


_MULTIPART = "multipart/mixed; boundary="


def token_boundary(request: PipelineRequest) -> None:
    """A Blob Batch request's multipart boundary made of token characters only.

    The SDK's boundary comes from the email package (``===============<digits>==``) and is
    sent unquoted, though ``=`` must be quoted in a Content-Type parameter (RFC 2045).
    Azure reads it anyway; Azurite takes the boundary as what follows the first ``=`` of
    the header, finds none, and refuses the whole batch with one 400 InvalidInput. A
    ``batch_<hex>`` boundary, as Azure's other SDKs send, is read alike by both. Runs
    before the request is signed (SharedKey signs Content-Length and Content-Type).
    """
    http = request.http_request
    content_type = http.headers.get("Content-Type", "")
    old = content_type[len(_MULTIPART) :]
    if not content_type.startswith(_MULTIPART) or "=" not in old or not http.data:
        return
    new = f"batch_{uuid.uuid4().hex}"
    http.set_bytes_body(bytes(http.data).replace(f"--{old}".encode(), f"--{new}".encode()))
    http.headers["Content-Type"] = _MULTIPART + new


def _credential(azure: AzureSettings) -> Any:
    """What BlobServiceClient authenticates with, as credentials.type says."""
    if azure.credentials == "client_secret":
        from azure.identity.aio import ClientSecretCredential

        return ClientSecretCredential(str(azure.tenantid), str(azure.clientid), str(azure.secret))
    if azure.credentials == "default_credentials":
        # environment, workload identity (AZURE_FEDERATED_TOKEN_FILE), managed identity
        from azure.identity.aio import DefaultAzureCredential

        return DefaultAzureCredential()
    return {"account_name": azure.accountname, "account_key": azure.accountkey}


class AzureStorage(ObjectStore):
    """A registry store in an Azure Blob container below ``<rootdirectory>/docker/registry/v2/``."""

    batch_max = BATCH
    container_word = "container"
    bogus_version = '"0x8D000000000000F"'
    credentials_hint = "accountname/accountkey or credentials, and the container's role assignment"
    driver = "azure"

    # the service's client, made by _connect
    _service: BlobServiceClient | None = None
    _credential: Any = None
    _client: ContainerClient | None = None

    def _locate(self) -> tuple[str, str]:
        assert self.settings.azure is not None
        self.azure = self.settings.azure
        endpoint = "connection string" if self.azure.connectionstring else self.azure.url
        return self.azure.container, endpoint

    async def _connect(self) -> None:
        options: dict[str, Any] = {
            "retry_total": 0,  # the layer's retry loop is the one that counts
            "connection_timeout": self.retry.connect_timeout,
            "read_timeout": self.retry.read_timeout,
            "user_agent": "registry-pruned",
        }
        try:
            if self.azure.connectionstring:
                service = BlobServiceClient.from_connection_string(
                    self.azure.connectionstring, **options
                )
            else:
                self._credential = _credential(self.azure)
                service = BlobServiceClient(self.azure.url, credential=self._credential, **options)
        except ValueError as exc:
            raise StorageError(f"{self.description}: cannot create Azure client: {exc}") from exc
        self._service = service
        self._client = service.get_container_client(self.azure.container)

    async def _disconnect(self) -> None:
        service, self._service, self._client = self._service, None, None
        credential, self._credential = self._credential, None
        if service is not None:
            await service.close()
        if credential is not None and hasattr(credential, "close"):
            await credential.close()

    def _container(self) -> ContainerClient:
        assert self._client is not None, "opened by _call"
        return self._client

    def _classify(self, exc: BaseException) -> tuple[Kind, str, int] | None:
        return classify(exc)

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, HttpResponseError):
            code, status = _status(exc)
            message = (exc.reason or str(exc).splitlines()[0] if str(exc) else "") or "no message"
            return f"{code or 'error'}: {message} (HTTP {status})"
        return f"{type(exc).__name__}: {exc}"

    # -- Azure's calls ------------------------------------------------------------------

    async def _check_container(self) -> float | None:
        await self._container().get_container_properties()
        return None  # the SDK's properties carry no Date: this host's clock is used

    async def _list_page(self, prefix: str, delimiter: str | None, token: str | None) -> Page:
        """One List Blobs page, its XML parsed here: the SDK's model-driven parse cost ~0.2 ms
        of CPU an object, twenty times this. Through the SDK's own pipeline (auth, transport)."""
        container = self._container()
        send = getattr(getattr(container, "_client", None), "_send_request", None)
        if send is None:
            return await self._list_page_sdk(prefix, delimiter, token)
        names = ("prefix", "delimiter", "marker")
        query = listing_query(names, prefix, delimiter, token, **_LIST_QUERY)
        request = HttpRequest(
            "GET",
            f"{container.url}?{urlencode(query)}",
            headers={"x-ms-version": container.api_version},
        )
        response = await send(request)
        body = await response.read()
        if response.status_code != 200:
            error = HttpResponseError(response=response)
            error.error_code = response.headers.get("x-ms-error-code") or ""
            raise error
        page = _parse_listing(body)
        if page is None:
            # a cut-off answer must not pass for a complete listing: retried
            raise aiohttp.ClientPayloadError("List Blobs answer is not a complete listing")
        return page

    async def _list_page_sdk(self, prefix: str, delimiter: str | None, token: str | None) -> Page:
        container = self._container()
        if delimiter:
            paged: Any = container.walk_blobs(
                name_starts_with=prefix, delimiter=delimiter, results_per_page=_PAGE
            )
        else:
            paged = container.list_blobs(name_starts_with=prefix, results_per_page=_PAGE)
        pages = paged.by_page(continuation_token=token)
        objects: list[Listed] = []
        prefixes: list[str] = []
        async for item in await anext(pages):
            if isinstance(item, BlobPrefix):
                prefixes.append(item.name)
                continue
            md5 = item.content_settings.content_md5
            modified = item.last_modified
            objects.append(
                (
                    item.name,
                    item.size,
                    modified.timestamp() if modified is not None else None,
                    bytes(md5).hex() if md5 else "",
                )
            )
        return Page(objects, prefixes, pages.continuation_token or None)

    async def _get(self, key: str, limit: int) -> bytes:
        return (await self._download(key, limit))[0]

    async def _get_versioned(self, key: str, limit: int) -> tuple[bytes, str]:
        return await self._download(key, limit)

    async def _download(self, key: str, limit: int) -> tuple[bytes, str]:
        """Content and ETag: one ranged GET of at most limit + 1 bytes (the size comes with
        it)."""
        blob = self._container().get_blob_client(key)
        try:
            downloader = await blob.download_blob(offset=0, length=limit + 1, max_concurrency=1)
        except HttpResponseError as exc:
            if exc.status_code == 416:
                # a range from offset 0 is invalid only on an empty blob
                properties = await blob.get_blob_properties()
                return b"", str(properties.etag or "")
            raise
        size = _total(downloader.properties.content_range) or downloader.properties.size
        if size is not None and size > limit:
            raise self._too_large(key, size, limit)
        data = await downloader.readall()
        if len(data) > limit:
            raise self._too_large(key, len(data), limit)
        return bytes(data), str(downloader.properties.etag or "")

    async def _put_if(self, key: str, data: bytes, version: str | None) -> str:
        """Put Blob that must not overwrite (create), or If-Match the ETag (replace)."""
        blob = self._container().get_blob_client(key)
        if version is None:
            answer = await blob.upload_blob(data, overwrite=False)
        else:
            answer = await blob.upload_blob(
                data, overwrite=True, etag=version, match_condition=MatchConditions.IfNotModified
            )
        return str(answer.get("etag") or "")

    async def _put(self, key: str, data: bytes) -> None:
        await self._container().upload_blob(key, data, overwrite=True)

    async def _head(self, key: str) -> tuple[int | None, float | None]:
        properties = await self._container().get_blob_client(key).get_blob_properties()
        modified = properties.last_modified
        return properties.size, modified.timestamp() if modified is not None else None

    async def _copy(self, src: str, dst: str) -> None:
        container = self._container()
        source = container.get_blob_client(src)
        target = container.get_blob_client(dst)
        copy = await target.start_copy_from_url(source.url)
        status = copy.get("copy_status")
        for _ in range(_COPY_POLLS):
            if status != "pending":
                break
            await asyncio.sleep(_COPY_POLL)
            status = (await target.get_blob_properties()).copy.status
        if status != "success":
            raise StorageError(f"{self.description}: copy of {src!r} ended {status!r}")

    async def _delete_batch(self, keys: list[str]) -> list[KeyFailure]:
        """One Blob Batch request of Delete Blob subrequests."""
        if len(keys) == 1:
            # no batch for one key: Azurite's one answer to a refused batch would read as
            # that key's failure
            try:
                await self._delete_one(keys[0])
            except HttpResponseError as exc:
                kind = (classify(exc) or (Kind.FATAL, "", 0))[0]
                if kind is Kind.MISSING:
                    return []
                return [KeyFailure(keys[0], self._describe(exc), kind is Kind.TRANSIENT)]
            return []
        try:
            answers = await self._container().delete_blobs(
                *keys, raise_on_any_failure=False, raw_request_hook=token_boundary
            )
        except HttpResponseError as exc:
            code, status = _status(exc)
            if status in (400, 404, 405, 501) and code not in _MISSING_CODES - {""}:
                raise BatchRefused(self._describe(exc)) from exc
            raise
        replies = [answer async for answer in answers]
        statuses = [answer.status_code for answer in replies]
        if len(replies) != len(keys) and statuses and all(st == 400 for st in statuses):
            # how Azurite refused a batch whose boundary it could not read (token_boundary):
            # one 400 for the whole
            raise BatchRefused(f"the batch was answered by {len(replies)} HTTP 400")
        out: list[KeyFailure] = []
        for i, key in enumerate(keys):
            if i >= len(replies):
                # no answer for this key: not known deleted, asked again
                out.append(KeyFailure(key, "no answer in the batch", True))
                continue
            status = statuses[i]
            if status < 300 or status == 404:
                continue
            code = replies[i].headers.get("x-ms-error-code") or ""
            transient = status == 429 or status >= 500 or code in _RETRY_CODES
            out.append(KeyFailure(key, f"{code or 'error'}: HTTP {status}", transient))
        if len(out) == len(keys) > 1 and all(st == 400 for st in statuses):
            raise BatchRefused(f"every subrequest answered HTTP 400 ({out[0].reason})")
        return out

    async def _delete_one(self, key: str) -> None:
        await self._container().delete_blob(key)


def _parse_listing(body: bytes) -> Page | None:
    """A List Blobs answer -> a Page; None unless it is a whole EnumerationResults."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    blobs = root.find("Blobs")
    if root.tag != "EnumerationResults" or blobs is None:
        return None
    objects: list[Listed] = []
    prefixes: list[str] = []
    for node in blobs:
        name = node.findtext("Name") or ""
        if node.tag == "BlobPrefix":
            prefixes.append(name)
            continue
        properties = node.find("Properties")
        size: int | None = None
        mtime: float | None = None
        md5 = ""
        if properties is not None:
            length = properties.findtext("Content-Length")
            size = int(length) if length else None
            modified = properties.findtext("Last-Modified")
            mtime = email.utils.parsedate_to_datetime(modified).timestamp() if modified else None
            digest = properties.findtext("Content-MD5")
            md5 = base64.b64decode(digest).hex() if digest else ""
        objects.append((name, size, mtime, md5))
    return Page(objects, prefixes, root.findtext("NextMarker") or None)


def _total(content_range: str | None) -> int | None:
    """The blob's whole size from a ranged answer's ``bytes 0-9/1234``."""
    total = (content_range or "").rpartition("/")[2]
    return int(total) if total.isdigit() else None
