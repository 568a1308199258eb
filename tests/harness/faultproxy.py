"""A reverse proxy in front of an S3 endpoint that injects faults on demand.

Requests go upstream verbatim (Host, raw path, body), so SigV4 signatures still verify."""

from __future__ import annotations

import asyncio
import socket
import struct
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from xml.sax.saxutils import escape

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

Predicate = Callable[[web.Request], bool]

#: fault kinds: 503 SlowDown, 500 InternalError, a TCP reset before / after the request
#: reached upstream, a delay before forwarding, a 200 DeleteResult failing every key, a 200
#: where upstream refused a conditional write (412: a store that ignores preconditions)
KINDS = (
    "slowdown",
    "internal",
    "reset",
    "reset_after",
    "delay",
    "delete_errors",
    "ignore_conditions",
)
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "content-length",
    }
)
_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def is_delete_objects(request: web.Request) -> bool:
    """POST ?delete (DeleteObjects)."""
    return request.method == "POST" and "delete" in request.query


def is_list(request: web.Request) -> bool:
    """GET ?list-type=2 (ListObjectsV2)."""
    return request.method == "GET" and request.query.get("list-type") == "2"


def is_get_object(request: web.Request) -> bool:
    """GET of an object (no sub-resource query)."""
    return request.method == "GET" and not request.query


@dataclass(slots=True)
class Fault:
    """One armed fault: ``times`` more injections (None = until cleared)."""

    kind: str
    times: int | None = 1
    match: Predicate | None = None
    delay: float = 0.0
    code: str = "InternalError"
    injected: int = 0

    def wants(self, request: web.Request) -> bool:
        if self.times is not None and self.injected >= self.times:
            return False
        return self.match is None or self.match(request)


@dataclass(frozen=True, slots=True)
class Seen:
    """A request as the proxy received it."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes
    fault: str | None = None


@dataclass(slots=True)
class _Stats:
    requests: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    seen: list[Seen] = field(default_factory=list)


def s3_error_body(code: str, message: str, resource: str = "") -> bytes:
    """An S3 XML error document."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource><RequestId>faultproxy</RequestId></Error>"
    ).encode()


def delete_request_keys(body: bytes) -> list[str]:
    """The keys named in a DeleteObjects request body."""
    root = ET.fromstring(body)
    return [(node.text or "") for node in root.iter() if node.tag in ("Key", f"{_S3_NS}Key")]


class FaultProxy:
    """Reverse proxy to ``upstream`` (``http://host:port``) on a free loopback port."""

    def __init__(self, upstream: str) -> None:
        self.upstream = URL(upstream)
        self.faults: list[Fault] = []
        self._stats = _Stats()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> int:
        """Requests received since the last ``reset_counts()``."""
        return self._stats.requests

    @property
    def injected(self) -> Counter[str]:
        """Faults injected per kind since the last ``reset_counts()``."""
        return self._stats.faults

    @property
    def seen(self) -> list[Seen]:
        return self._stats.seen

    def inject(
        self,
        kind: str,
        times: int | None = 1,
        *,
        match: Predicate | None = None,
        delay: float = 0.0,
        code: str = "InternalError",
    ) -> Fault:
        """Arm a fault for the next ``times`` matching requests (first armed, first used)."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {', '.join(KINDS)}")
        fault = Fault(kind, times, match, delay, code)
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Disarm every fault."""
        self.faults.clear()

    def reset_counts(self) -> None:
        self._stats = _Stats()

    async def start(self) -> FaultProxy:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=0),
            # only what the client sent goes upstream
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _take(self, request: web.Request) -> Fault | None:
        for fault in self.faults:
            if fault.wants(request):
                fault.injected += 1
                return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fault = self._take(request)
        stats = self._stats
        stats.requests += 1
        stats.seen.append(
            Seen(
                request.method,
                request.raw_path,
                CIMultiDict(request.headers),
                body,
                fault.kind if fault else None,
            )
        )
        if fault is None:
            return await self._forward(request, body)
        stats.faults[fault.kind] += 1
        match fault.kind:
            case "slowdown":
                return _xml(503, s3_error_body("SlowDown", "Please reduce your request rate."))
            case "internal":
                message = "We encountered an internal error. Please try again."
                return _xml(500, s3_error_body("InternalError", message))
            case "reset":
                return _reset(request)
            case "reset_after":
                await self._forward(request, body)
                return _reset(request)
            case "delay":
                await asyncio.sleep(fault.delay)
                return await self._forward(request, body)
            case "delete_errors":
                return _xml(200, _delete_errors(body, fault.code))
            case "ignore_conditions":
                answer = await self._forward(request, body)
                if answer.status != 412:
                    return answer
                return web.Response(status=200, headers={"ETag": '"precondition-ignored"'})
        raise AssertionError(fault.kind)

    async def _forward(self, request: web.Request, body: bytes) -> web.StreamResponse:
        assert self._session is not None
        target = URL(str(self.upstream.with_path("")) + request.raw_path, encoded=True)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        async with self._session.request(
            request.method,
            target,
            headers=headers,
            data=body if body else None,
            allow_redirects=False,
        ) as answer:
            payload = await answer.read()
            out = CIMultiDict((k, v) for k, v in answer.headers.items() if k.lower() not in _HOP)
            if request.method == "HEAD":
                # HEAD answers carry the object's length but no body
                length = answer.headers.get("Content-Length")
                response = web.StreamResponse(status=answer.status, headers=out)
                if length is not None:
                    response.content_length = int(length)
                await response.prepare(request)
                return response
            return web.Response(status=answer.status, body=payload, headers=out)


def _xml(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/xml")


def _delete_errors(body: bytes, code: str) -> bytes:
    errors = "".join(
        f"<Error><Key>{escape(key)}</Key><Code>{escape(code)}</Code>"
        f"<Message>injected by faultproxy</Message></Error>"
        for key in delete_request_keys(body)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{errors}</DeleteResult>'
    ).encode()


def _reset(request: web.Request) -> web.StreamResponse:
    """Drop the client's connection with a TCP RST; nothing is answered."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=599)
