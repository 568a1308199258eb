"""HTTP views of the listings and of what verify and recover found (read only)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from daemon import listings
from daemon.findings import Recovered, Verification
from daemon.runs import RUNNING, SUCCEEDED, Run, RunManager
from daemon.storage.base import Storage, StorageError
from daemon.verify import RECOVER, VERIFY

FINDINGS_TEXT_LIMIT = 4 << 20  # bytes of findings a text answer quotes


def add_listing_routes(router: web.UrlDispatcher, storage_key: web.AppKey[Storage]) -> None:
    """GET /repositories, /repositories/<name>/manifests, /blobs: NDJSON, streamed."""

    async def repositories(request: web.Request) -> web.StreamResponse:
        return await _stream(request, listings.rows(request.app[storage_key], "repositories"))

    async def manifests(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        rows = listings.rows(request.app[storage_key], "manifests", name)
        return await _stream(request, rows)

    async def blobs(request: web.Request) -> web.StreamResponse:
        return await _stream(request, listings.rows(request.app[storage_key], "blobs"))

    router.add_get("/repositories", repositories)
    router.add_get("/repositories/{name:.+}/manifests", manifests)
    router.add_get("/blobs", blobs)


async def _stream(request: web.Request, rows: Any) -> web.StreamResponse:
    # the first row before the headers: a missing repository or a dead store is an error
    # status, not an empty 200
    try:
        first = await anext(rows, None)
    except listings.NoRepository as exc:
        return web.json_response({"error": str(exc)}, status=404)
    except StorageError as exc:
        return web.json_response({"error": f"storage: {exc}"}, status=503)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    batch: list[str] = []
    if first is not None:
        batch.append(json.dumps(first))
        try:
            async for row in rows:
                batch.append(json.dumps(row))
                if len(batch) >= 500:
                    await response.write(("\n".join(batch) + "\n").encode())
                    batch.clear()
        except StorageError as exc:
            batch.append(json.dumps({"error": f"storage: {exc}; the listing is incomplete"}))
    if batch:
        await response.write(("\n".join(batch) + "\n").encode())
    await response.write_eof()
    return response


def _messages(manager: RunManager, run: Run) -> list[str]:
    try:
        with open(manager.findings_path(run.id), "rb") as fh:
            data = fh.read(FINDINGS_TEXT_LIMIT)
    except FileNotFoundError:
        return []
    lines = []
    for raw in data.splitlines():
        try:
            lines.append(str(json.loads(raw)["message"]))
        except (ValueError, KeyError, TypeError):
            break  # the cut at the limit: the rest is in GET /runs/<id>/broken
    return lines


def findings_text(manager: RunManager, run: Run, text: str) -> str:
    """A run's text answer with verify's or recover's lines in the original words."""
    doc = run.document()
    if doc["state"] == RUNNING:
        return text
    verification = doc.get("verification")
    recovery = doc.get("recovery")
    if verification is None and recovery is None:
        return text
    summary: list[str] = []
    if isinstance(verification, dict):
        fields = Verification.__dataclass_fields__
        summary = Verification(**{k: v for k, v in verification.items() if k in fields}).lines()
    elif isinstance(recovery, dict):
        summary = Recovered.from_document(recovery).lines()
    lines = text.split("\n")
    failure = lines[-1:] if doc["state"] != SUCCEEDED and lines[-1].startswith("Run ") else []
    if doc["mode"] in (VERIFY, RECOVER):
        body = summary  # check's "Would delete 0 blobs" means nothing here
    else:
        body = (lines[:-1] if failure else lines) + summary
    return "\n".join(_messages(manager, run) + body + failure)
