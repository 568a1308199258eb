"""Refuse what a web page could make a browser send: cross-site requests and rebound names.

curl, the CLI and probes send no Origin and no Sec-Fetch-* and name the daemon by a loopback
name or an IP address: they pass. A page elsewhere cannot pass, even through DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from aiohttp import web
from yarl import URL

from daemon.config import ConfigError

#: the header the daemon's own page sets with fetch on requests that change state; a form
#: cannot set it, and a page elsewhere cannot without a CORS preflight this daemon never grants
CSRF_HEADER = "X-Registry-Pruned"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_HOST = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>\d{1,5}))?"
)
_NAME = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.?"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def allowed_host_names(values: Iterable[str]) -> frozenset[str]:
    """``--allowed-host`` values -> the names to accept; ConfigError for anything but a name."""
    names: set[str] = set()
    for value in values:
        name = value.strip()
        if not name:
            continue
        if not _NAME.fullmatch(name) or len(name) > 253:
            raise ConfigError(
                f"allowed host {value[:80]!r} must be a host name without scheme or port, "
                "e.g. registry-pruned.openshift-image-registry.svc"
            )
        names.add(name.lower().rstrip("."))
    return frozenset(names)


def _split_host(value: str) -> tuple[str, int | None, bool] | None:
    """'name:port' / '[v6]:port' -> (host, port, is an IP address); None if malformed."""
    match = _HOST.fullmatch(value.strip())
    if match is None:
        return None
    port = int(match["port"]) if match["port"] else None
    if match["v6"] is not None:
        try:
            return str(ipaddress.IPv6Address(match["v6"])), port, True
        except ValueError:
            return None
    name = match["name"].lower()
    try:
        return str(ipaddress.IPv4Address(name)), port, True
    except ValueError:
        return name, port, False


class OriginGuard:
    """Decides whether a request may have come from a web page that is not the daemon's own."""

    def __init__(
        self,
        allowed_hosts: Iterable[str] = (),
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.allowed = allowed_host_names(allowed_hosts)
        self.log = log or structlog.get_logger()

    def host_ok(self, host: str, is_ip: bool) -> bool:
        # An IP address cannot be rebound: a page can only reach it under its own origin.
        # A name can: only localhost (browsers resolve it to loopback themselves) and the
        # names the operator gave are trusted.
        return is_ip or host == "localhost" or host.rstrip(".") in self.allowed

    def refusal(self, request: web.Request) -> str | None:
        """Why ``request`` is refused, or None when it may go on."""
        headers = request.headers
        raw_host = headers.get("Host")
        host: tuple[str, int | None, bool] | None = None
        if raw_host is not None:
            # no Host at all: HTTP/1.0 clients; every browser sends one
            host = _split_host(raw_host)
            if host is None or not self.host_ok(host[0], host[2]):
                return (
                    f"refused: Host {raw_host[:100]!r} is not a name this daemon answers to "
                    "(localhost, an IP address, or a name given with --allowed-host / "
                    "PRUNER_ALLOWED_HOSTS); a web page may be using DNS rebinding to reach it. "
                    "If it is your Service's name, add it with --allowed-host"
                )
        site = headers.get("Sec-Fetch-Site", "").strip().lower()
        if site in ("cross-site", "same-site"):
            return (
                f"refused: the browser marks this request {site} (Sec-Fetch-Site): a web page "
                "on another site may not drive this API; use curl, the CLI or the daemon's "
                "own page"
            )
        origin = headers.get("Origin")
        if origin is not None and not _same_origin(origin, host):
            return (
                f"refused: the request comes from a web page at {origin[:100]!r}, not from "
                "this daemon's own origin; a web page on another site may not drive this API"
            )
        browser = origin is not None or any(k.lower().startswith("sec-fetch-") for k in headers)
        if browser and request.method not in SAFE_METHODS and not headers.get(CSRF_HEADER):
            return (
                f"refused: a browser request that changes state must carry the header "
                f"'{CSRF_HEADER}: 1', which the daemon's own page sets with fetch and a form "
                "cannot; from a shell, use curl"
            )
        return None

    def middleware(self) -> Any:
        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            reason = self.refusal(request)
            if reason is not None:
                # the reason names what to change, e.g. a Service name to allow
                self.log.info("browser guard: request refused", path=request.path, reason=reason)
                return web.json_response({"error": reason}, status=403)
            return await handler(request)

        return guard


def _same_origin(origin: str, host: tuple[str, int | None, bool] | None) -> bool:
    """Whether the Origin header names the host:port the request was sent to."""
    if host is None:
        return False  # no Host to compare with: nothing proves it is our own page
    try:
        url = URL(origin.strip())
    except ValueError:
        return False
    # raw_host: the ASCII (punycode) form, as a Host header carries it
    raw = url.raw_host
    if url.scheme not in _DEFAULT_PORTS or not raw or url.path not in ("", "/"):
        return False  # 'null' (sandboxed frames, file:) included
    parsed = _split_host(raw if ":" not in raw else f"[{raw}]")
    if parsed is None:
        return False
    port = url.explicit_port or _DEFAULT_PORTS[url.scheme]
    name, host_port, _ip = host
    return parsed[0] == name and port == (host_port or _DEFAULT_PORTS[url.scheme])
