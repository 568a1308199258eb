"""The status page: one self-contained HTML file shipped in the package, served at ``/``."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from aiohttp import web

_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


@cache
def _page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy (its one inline script allowed by hash)."""
    body = resources.files(__name__).joinpath("index.html").read_bytes()
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'"
        for s in _SCRIPT.findall(body)
    )
    # nothing from elsewhere: the page talks to this daemon only, and is framed by nobody
    policy = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return body, policy


async def index(request: web.Request) -> web.Response:
    """GET /: the status page for a browser; for anything else, where the API is."""
    if "text/html" not in request.headers.get("Accept", ""):
        return web.json_response(
            {
                "service": "registry-pruned",
                "status_page": "GET / with Accept: text/html",
                "runs": "/runs",
                "start": "POST /prune?mode=check",
            }
        )
    body, policy = _page()
    return web.Response(
        body=body,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": policy,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )
