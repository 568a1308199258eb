"""aiohttp routes over the run manager: the HTTP contract of DESIGN.md."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from daemon import logs, page
from daemon import usage as usage_report
from daemon.api_views import add_listing_routes, findings_text
from daemon.auth import VERIFIED, Authenticator, auth_enabled, create_reviewer, is_loopback
from daemon.config import SOURCES, ConfigError, Settings, parse_duration
from daemon.lease import LeaseHeld
from daemon.metrics import CONTENT_TYPE, Metrics
from daemon.origin import OriginGuard, allowed_host_names
from daemon.prune import CHECK, DELETE, RunOptions, Summary
from daemon.readiness import Readiness
from daemon.report import Ending, restore_line, summary_lines
from daemon.retention import REVISION_PARAMS, PolicyError, revision_options
from daemon.runs import RESTORED, RUNNING, Busy, Run, RunManager, manager_for, options_for
from daemon.sources.base import ReadOnlyRefused
from daemon.storage import open_storage
from daemon.storage.base import Storage, StorageError
from daemon.trash import TrashGone, purge_now, trashes
from daemon.trash import listing as trash_listing
from daemon.verify import RECOVER, VERIFY

PRUNE_PARAMS = {
    "mode",
    "wait",
    "grace",
    "source",
    "online",
    "apply",
    "usage",
    "trash",
    *REVISION_PARAMS,
}
MODES = (CHECK, DELETE, VERIFY, RECOVER)
MANAGER = web.AppKey("manager", RunManager)
SETTINGS = web.AppKey("settings", Settings)
STORAGE = web.AppKey("storage", Storage)
METRICS = web.AppKey("metrics", Metrics)
LOG = web.AppKey("log", structlog.typing.FilteringBoundLogger)
READINESS = web.AppKey("readiness", Readiness)
#: no auth: whoever gets past the origin guard may read everything, /readyz's details too
OPEN = web.AppKey("open", bool)
#: the run a /runs/{id}... request names, resolved once (``latest`` included) for every layer
RUN_ID = web.RequestKey("run_id", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    pass


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _bool(value: str, name: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", ""):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise BadRequest(f"{name} must be true or false, not {value[:50]!r}")


def _wants_text(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "text/plain" in accept and "application/json" not in accept


def _run_response(request: web.Request, run: Run, status: int = 200) -> web.Response:
    headers = {"Location": f"/runs/{run.id}"}
    if _wants_text(request):
        text = findings_text(request.app[MANAGER], run, _text(run))
        return web.Response(text=text + "\n", status=status, headers=headers)
    return web.json_response(run.document(), status=status, headers=headers)


def _text(run: Run) -> str:
    doc = run.document()
    summary = Summary(**{k: v for k, v in doc["summary"].items() if k in Summary.__slots__})
    ending = Ending(
        run_id=doc["id"],
        state=doc["state"],
        phase=doc.get("phase") or "",
        error=doc.get("error"),
        grace=doc.get("grace_seconds"),
        upload_max_age=doc.get("upload_max_age_seconds"),
        revisions_pruned="untagged" in doc,
    )
    restored = doc.get("restore") if doc["state"] == RESTORED else None
    if restored:
        ending = dataclasses.replace(ending, state=doc.get("state_before_restore") or "succeeded")
    lines = summary_lines(doc["mode"], summary, ending)
    if restored:
        lines.append(restore_line(restored))
    if doc["state"] == RUNNING:
        progress = doc["progress"]
        lines = [
            f"Run {doc['id']} is running ({doc['phase']}): "
            f"{progress.get('blobs_scanned', 0)} blobs scanned, "
            f"{progress.get('candidates', 0)} candidates so far"
        ]
    return "\n".join(lines)


def _parse_prune(request: web.Request, settings: Settings) -> tuple[str, str, RunOptions, bool]:
    query = request.query
    unknown = sorted(set(query) - PRUNE_PARAMS)
    if unknown:
        raise BadRequest(
            f"unknown parameter {', '.join(unknown)}; accepted: {', '.join(sorted(PRUNE_PARAMS))}"
        )
    for name in query:
        if len(query.getall(name)) > 1 or len(query[name]) > 64:
            raise BadRequest(f"{name} must be given once and be short")
    mode = query.get("mode", "")
    if mode not in MODES:
        raise BadRequest(f"mode must be check or delete (or verify, recover), not {mode[:50]!r}")
    source = query.get("source", settings.source)
    if source not in SOURCES:
        raise BadRequest(f"source must be one of {', '.join(SOURCES)}, not {source[:50]!r}")
    apply = _bool(query.get("apply", "false"), "apply")
    if mode == RECOVER and source != "openshift":
        raise BadRequest(
            "mode=recover needs the openshift source (source=openshift): it re-registers "
            "manifests that have no Image object in the cluster"
        )
    if apply and mode != RECOVER:
        raise BadRequest("apply is for mode=recover only")
    try:
        grace = parse_duration(query["grace"]) if "grace" in query else settings.grace
    except ValueError as exc:
        raise BadRequest(f"grace: {exc}") from None
    try:
        trash = parse_duration(query["trash"]) if "trash" in query else settings.trash
    except ValueError as exc:
        raise BadRequest(f"trash: {exc}") from None
    if "trash" in query and mode != DELETE:
        raise BadRequest("trash is for mode=delete only")
    online = _bool(query.get("online", "false"), "online")
    wait = _bool(query.get("wait", "false"), "wait")
    # per-repository usage of a check (on by default): on a filesystem it stats every blob
    usage = _bool(query.get("usage", "true"), "usage")
    try:
        untagged, retention = revision_options(
            _bool(query.get("untagged", "false"), "untagged"),
            {name: query[name] for name in REVISION_PARAMS if name in query and name != "untagged"},
            mode,
            source,
        )
    except PolicyError as exc:
        raise BadRequest(str(exc)) from None
    options = options_for(
        settings,
        mode,
        grace=grace,
        online=online,
        apply=apply,
        usage=usage,
        untagged=untagged,
        retention=retention,
        trash=trash,
    )
    return mode, source, options, wait


async def prune(request: web.Request) -> web.StreamResponse:
    settings, manager = request.app[SETTINGS], request.app[MANAGER]
    try:
        mode, source, options, wait = _parse_prune(request, settings)
    except BadRequest as exc:
        return _error(400, str(exc))
    if request.method == "GET" and mode == DELETE:
        return _error(
            405,
            f"deleting needs POST: curl -X POST '{_reachable(settings.listen)}/prune?mode=delete'",
        )
    if request.method == "GET" and options.apply:
        return _error(
            405,
            "applying needs POST: "
            f"curl -X POST '{_reachable(settings.listen)}/prune?mode=recover&apply=true'",
        )
    try:
        run = await manager.start(mode, source, options)
    except Busy as exc:
        return _error(409, str(exc), active=exc.active)
    except ReadOnlyRefused as exc:
        # known before anything started: an answer, not a failed run in the history
        return _error(409, exc.error, hint=exc.hint)
    if wait:
        await run.done.wait()
        return _run_response(request, run, 200)
    return _run_response(request, run, 202)


def _find(request: web.Request) -> Run:
    # never resolve ``latest`` again here: auth decided on the run resolve_run named
    run = request.app[MANAGER].runs.get(request[RUN_ID])
    if run is None:
        raise web.HTTPNotFound(
            text=json.dumps({"error": f"no run {request.match_info['id'][:80]!r}; see GET /runs"}),
            content_type="application/json",
        )
    return run


async def list_runs(request: web.Request) -> web.Response:
    runs = request.app[MANAGER].ordered()
    if _wants_text(request):
        text = "\n".join(f"{r.id} {r.mode} {r.state}" for r in runs)
        return web.Response(text=text + "\n")
    return web.json_response([r.document() for r in runs])


async def get_run(request: web.Request) -> web.Response:
    return _run_response(request, _find(request))


async def candidates(request: web.Request) -> web.StreamResponse:
    run = _find(request)
    return await _follow(request, run, request.app[MANAGER].candidates_path(run.id))


async def removed_manifests(request: web.Request) -> web.StreamResponse:
    """/runs/<id>/manifests: revisions an untagged/retention run removes (or would)."""
    run = _find(request)
    return await _follow(request, run, request.app[MANAGER].manifests_path(run.id))


async def findings(request: web.Request) -> web.StreamResponse:
    """/runs/<id>/broken and /runs/<id>/lost-found: what verify or recover found."""
    run = _find(request)
    return await _follow(request, run, request.app[MANAGER].findings_path(run.id))


async def _follow(request: web.Request, run: Run, path: Path) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    offset = 0
    while True:
        # follow the file while the run writes it, like tail -f, until the run ends
        finished = run.state != RUNNING
        chunk = await asyncio.to_thread(_read_from, path, offset)
        if chunk:
            cut = chunk.rfind(b"\n") + 1
            if cut:
                await response.write(chunk[:cut])
                offset += cut
        elif finished:
            break
        else:
            await asyncio.sleep(0.25)
    await response.write_eof()
    return response


def _read_from(path: Path, offset: int, size: int = 1 << 20) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)
    except FileNotFoundError:
        return b""


async def usage(request: web.Request) -> web.Response:
    """GET /runs/<id>/usage: per repository, by exclusive bytes; ?top=N; text/plain table."""
    run = _find(request)
    top = request.query.get("top")
    if top is not None and not (top.isdigit() and len(top) < 10):
        return _error(400, f"top must be a whole number, not {top[:50]!r}")
    path: Path = request.app[MANAGER].usage_path(run.id)
    try:
        document = json.loads(await asyncio.to_thread(path.read_bytes))
    except FileNotFoundError:
        why = "is still running" if run.state == RUNNING else f"is a {run.mode} run"
        if run.state != RUNNING and run.mode == CHECK:
            why = f"ended {run.state} or its source reports no usage"
        return _error(
            404,
            f"run {run.id} has no usage report: it {why}; a storage-source check that "
            "succeeds has one (GET /runs/latest/usage)",
        )
    document = usage_report.top(document, int(top) if top is not None else None)
    if _wants_text(request):
        return web.Response(text=usage_report.table(document) + "\n")
    return web.json_response(document)


async def stop_run(request: web.Request) -> web.Response:
    run = _find(request)
    if run.state != RUNNING:
        return _error(409, f"run {run.id} is {run.state}, not running")
    if run.saved is not None:
        return _error(
            409,
            f"run {run.id} is a one-shot run of another process",
            hint="stop it where it runs (Ctrl-C, or SIGTERM to that registry-pruned process)",
        )
    await request.app[MANAGER].stop(run)
    return web.json_response(run.document(), status=202)


async def restore_run(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    run = _find(request)
    try:
        run = await manager.restore(run.id)
    except Busy as exc:
        return _error(409, str(exc), active=exc.active)
    except (TrashGone, LeaseHeld) as exc:
        return _error(409, str(exc))
    except StorageError as exc:
        return _error(503, f"{exc}; the restore is resumable: ask again")
    return _run_response(request, run, 200)


async def list_trash(request: web.Request) -> web.Response:
    return web.json_response(trash_listing(await trashes(request.app[STORAGE])))


async def purge_trash(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    if manager.active is not None:
        return _error(409, Busy(manager.active.id).args[0], active=manager.active.id)
    try:
        runs, freed = await purge_now(request.app[STORAGE], manager.dead_runs(), request.app[LOG])
    except LeaseHeld as exc:
        return _error(409, str(exc))
    except StorageError as exc:
        return _error(503, str(exc))
    return web.json_response({"purged_runs": runs, "freed_bytes": freed})


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    error = await request.app[READINESS].error()
    # probes are anonymous: they learn ready or not, never the store's name or its errors
    detailed = request.app[OPEN] or request.get(VERIFIED, False)
    if error is not None:
        body = {"status": "not ready", "error": error} if detailed else {"status": "not ready"}
        return web.json_response(body, status=503)
    if detailed:
        return web.json_response({"status": "ready", "storage": request.app[STORAGE].description})
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


@web.middleware
async def errors_follow_accept(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With ``Accept: text/plain`` an error is one line of text ending in a newline: what
    went wrong, then what to do."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if not _wants_text(request) or exc.content_type != "application/json":
            raise
        return _text_error(exc.status, exc.text or "", exc.headers)
    if (
        response.status < 400
        or not isinstance(response, web.Response)
        or response.content_type != "application/json"
        or not _wants_text(request)
    ):
        return response
    return _text_error(response.status, response.text or "", response.headers)


def _text_error(status: int, body: str, headers: Mapping[str, str]) -> web.Response:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    line = " ".join(str(doc.get("error") or body or status).split())
    if doc.get("hint"):
        line += "; " + " ".join(str(doc["hint"]).split())
    kept = {k: v for k, v in headers.items() if k in ("WWW-Authenticate", "Allow", "Location")}
    return web.Response(text=line + "\n", status=status, headers=kept)


@web.middleware
async def errors_and_access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JSON bodies for aiohttp's own errors; one debug line per request."""
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        if exc.content_type == "application/json":
            raise
        message = {404: "no such path; see the API in the README", 405: "method not allowed"}
        return _error(exc.status, message.get(exc.status, exc.reason))
    finally:
        request.app[LOG].debug(
            "request",
            method=request.method,
            path=request.path,
            status=status,
            ms=round((time.monotonic() - started) * 1000, 1),
        )


@web.middleware
async def resolve_run(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Resolve a route's run id once, before auth awaits anything: ``latest`` then names
    the same run for the permission check and for the handler."""
    name = request.match_info.get("id")
    if name is not None:
        request[RUN_ID] = request.app[MANAGER].resolve(name)
    return await handler(request)


def allowed_hosts(settings: Settings) -> list[str]:
    """--allowed-host names, and the listen address when it is a name."""
    host, _port = split_listen(settings.listen)
    names = list(settings.allowed_hosts)
    if not is_loopback(host) and not _is_address(host):
        names.append(host)
    return names


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def make_app(
    settings: Settings,
    storage: Storage,
    manager: RunManager,
    metrics_: Metrics,
    log: structlog.typing.FilteringBoundLogger,
    auth: Authenticator | None = None,
) -> web.Application:
    # inside the access log, so refused requests are logged with their status; the origin
    # guard first: a forged request costs no token review. Outermost, errors follow Accept
    middlewares: list[Any] = [
        errors_follow_accept,
        errors_and_access_log,
        OriginGuard(allowed_hosts(settings), log).middleware(),
        resolve_run,
    ]
    if auth is not None:

        def run_mode(request: web.Request) -> str | None:
            run = manager.runs.get(request.get(RUN_ID, ""))
            return run.mode if run is not None else None

        middlewares.append(auth.middleware(run_mode))
    app = web.Application(middlewares=middlewares)
    app[SETTINGS], app[STORAGE], app[MANAGER], app[METRICS], app[LOG] = (
        settings,
        storage,
        manager,
        metrics_,
        log,
    )
    app[READINESS] = Readiness(storage)
    app[OPEN] = auth is None
    app.router.add_get("/", page.index)
    app.router.add_route("POST", "/prune", prune)
    app.router.add_route("GET", "/prune", prune)
    app.router.add_get("/runs", list_runs)
    app.router.add_get("/runs/{id}", get_run)
    app.router.add_get("/runs/{id}/candidates", candidates)
    app.router.add_get("/runs/{id}/manifests", removed_manifests)
    app.router.add_get("/runs/{id}/broken", findings)
    app.router.add_get("/runs/{id}/lost-found", findings)
    add_listing_routes(app.router, STORAGE)
    app.router.add_get("/runs/{id}/usage", usage)
    app.router.add_post("/runs/{id}/stop", stop_run)
    app.router.add_post("/runs/{id}/restore", restore_run)
    app.router.add_get("/trash", list_trash)
    app.router.add_post("/trash/purge", purge_trash)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def build(
    settings: Settings,
    log: structlog.typing.FilteringBoundLogger,
    auth: Authenticator | None = None,
) -> tuple[web.Application, RunManager, Storage]:
    """The app with its storage and run manager, history loaded."""
    storage = open_storage(settings.storage, settings.workers)

    holder: dict[str, Metrics] = {}
    manager = manager_for(settings, storage, log, on_finish=lambda run: holder["m"].record(run))
    holder["m"] = Metrics(lambda: manager.active)
    await manager.load()
    holder["m"].restore(r.document() for r in reversed(manager.ordered()))
    app = make_app(settings, storage, manager, holder["m"], log, auth)
    # one-shot CLI runs sharing the state directory show up in the history as they go
    follower: list[asyncio.Task[None]] = []

    async def on_startup(_app: web.Application) -> None:
        follower.append(asyncio.create_task(manager.follow()))

    async def on_shutdown(_app: web.Application) -> None:
        for task in follower:
            task.cancel()
        await manager.shutdown()
        await storage.close()
        if auth is not None:
            await auth.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    return app, manager, storage


def _reachable(listen: str) -> str:
    """Where a shell next to the daemon reaches it: its listen address, any-address as
    localhost."""
    host, port = split_listen(listen)
    if host in ("0.0.0.0", "::", ""):
        host = "localhost"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"listen address {listen!r} must be host:port, e.g. 127.0.0.1:8099")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(settings: Settings) -> int:
    """Run the daemon until SIGTERM/SIGINT; the active run is stopped and recorded first."""
    log = logs.make_logger(settings.log_level, settings.log_format)
    try:
        host, port = split_listen(settings.listen)
        use_auth = auth_enabled(settings, host)
        allowed_host_names(allowed_hosts(settings))
    except ConfigError as exc:
        log.error(str(exc))
        return 2
    if not use_auth and not is_loopback(host):
        log.warning(
            "listening beyond loopback WITHOUT authentication (--insecure-no-auth): anyone "
            "who can reach this port can start delete runs",
            address=settings.listen,
        )

    async def main() -> int:
        auth = None
        if use_auth:
            try:
                reviewer = await create_reviewer(settings.kubeconfig)
            except ConfigError as exc:
                log.error(str(exc))
                return 2
            auth = Authenticator.from_settings(settings, reviewer, log)
        app, _manager, _storage = await build(settings, log, auth)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        log.info(
            "listening",
            address=f"{host}:{port}",
            store=settings.storage.describe(),
            auth=f"on ({auth.check} to read and check, {auth.delete} to delete)"
            if auth is not None
            else "off",
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        await runner.cleanup()
        return 0

    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main())
    return 0
