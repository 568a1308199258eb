"""``registry-pruned run|status|history|stop``: drive a running daemon over its HTTP API.

A run is followed with a progress bar (rich) on a terminal, and with one plain line every
few seconds in a pipe or a CI log. Blocking urllib: the client has nothing else to wait on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from daemon.retention import add_revision_flags
from daemon.units import bytes_size

DEFAULT_URL = "http://127.0.0.1:8099"
#: the header the daemon's CSRF guard asks of requests that change state
CLIENT_HEADER = ("X-Registry-Pruned", "1")


class ClientError(Exception):
    """The daemon could not be reached or refused the request; the message says why."""


class Daemon:
    """The daemon's HTTP API, with the bearer token when one is given."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 30.0,
        token_file: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.token_file = token_file
        self.timeout = timeout

    def _token(self) -> str | None:
        if self.token_file:
            # read at each request: the kubelet rotates a projected token while a run goes on
            try:
                with open(self.token_file) as fh:
                    return fh.read().strip()
            except OSError as exc:
                raise ClientError(f"cannot read the token file {self.token_file}: {exc}") from None
        return self.token

    def request(
        self, method: str, path: str, accept: str = "application/json"
    ) -> tuple[int, bytes]:
        headers = {"Accept": accept, CLIENT_HEADER[0]: CLIENT_HEADER[1]}
        token = self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        # imported here: urllib.request brings http.client, email and ssl (~15 ms), which a
        # one-shot check or delete, the CLI's other commands, never needs
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(
                f"cannot reach the daemon at {self.url}: {reason} (is `registry-pruned serve` "
                "running there? --url or PRUNER_URL)"
            ) from None

    def json(self, method: str, path: str) -> tuple[int, Any]:
        status, body = self.request(method, path)
        try:
            return status, json.loads(body)
        except ValueError:
            raise ClientError(f"{method} {path}: {status}, not JSON: {body[:200]!r}") from None

    def expect(self, method: str, path: str, *ok: int) -> Any:
        status, doc = self.json(method, path)
        if status not in ok:
            message = doc.get("error") if isinstance(doc, dict) else None
            if status == 401:
                message = f"{message or 'unauthorized'} (give a token: --token or PRUNER_TOKEN)"
            raise ClientError(f"{method} {path}: {status}: {message or doc}")
        return doc


# -- what a progress line says -----------------------------------------------------------


def phase_counter(doc: dict[str, Any]) -> tuple[str, int, int | None]:
    """The phase's own counter: (what it counts, done, total or None)."""
    progress = doc.get("progress", {})
    phase = doc.get("phase", "")
    if phase == "scan-repositories":
        return "repositories", progress.get("repositories", 0), None
    if phase == "mark":
        return "manifests", progress.get("manifests", 0), progress.get("manifests_total") or None
    if phase == "delete":
        done = progress.get("deleted", 0) + progress.get("errors", 0)
        return "blobs deleted", done, progress.get("candidates") or None
    return "blobs", progress.get("blobs_scanned", 0), None


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "eta --"
    seconds = round(seconds)
    if seconds >= 3600:
        return f"eta {seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"eta {seconds // 60}m{seconds % 60:02d}s"
    return f"eta {seconds}s"


class Rate:
    """Items a second of the current phase's counter, between two looks."""

    def __init__(self) -> None:
        self.last: tuple[str, int, float] | None = None
        self.value: float | None = None

    def update(self, what: str, done: int, now: float) -> float | None:
        if self.last is not None and self.last[0] == what and now > self.last[2]:
            self.value = (done - self.last[1]) / (now - self.last[2])
        elif self.last is None or self.last[0] != what:
            self.value = None
        self.last = (what, done, now)
        return self.value


def progress_line(doc: dict[str, Any], rate: float | None) -> str:
    """One plain line: phase, percent, counter, rate, ETA."""
    progress = doc.get("progress", {})
    what, done, total = phase_counter(doc)
    count = f"{done}/{total} {what}" if total else f"{done} {what}"
    speed = f", {rate:.0f}/s" if rate is not None else ""
    percent = 100 * float(progress.get("fraction") or 0)
    return (
        f"{doc.get('phase', '?')} {percent:5.1f}%  {count}{speed}  "
        f"{progress.get('candidates', 0)} candidates  {eta_text(progress.get('eta_seconds'))}"
    )


class ProgressView:
    """A bar on a terminal (rich), a plain line every ``interval`` seconds elsewhere."""

    def __init__(self, stream: TextIO, interval: float = 5.0, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.interval = interval
        self.rate = Rate()
        self._printed = 0.0
        self._bar: Any = None  # rich's Progress, on a terminal
        self._task: Any = None

    def __enter__(self) -> ProgressView:
        if self.tty:
            # imported here: a pipe, a log or a spawned reader process needs no rich (~6 MB)
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

            self._bar = Progress(
                TextColumn("{task.fields[phase]:<17}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[count]}"),
                TextColumn("{task.fields[speed]}"),
                TextColumn("{task.fields[eta]}"),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("run", total=1.0, phase="", count="", speed="", eta="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def show(self, doc: dict[str, Any], final: bool = False) -> None:
        now = time.monotonic()
        what, done, total = phase_counter(doc)
        rate = self.rate.update(what, done, now)
        progress = doc.get("progress", {})
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=float(progress.get("fraction") or 0),
                phase=doc.get("phase", ""),
                count=f"{done}/{total} {what}" if total else f"{done} {what}",
                speed=f"{rate:.0f}/s" if rate is not None else "",
                eta=eta_text(progress.get("eta_seconds")),
            )
            return
        if final or now - self._printed >= self.interval:
            self._printed = now
            print(progress_line(doc, rate), file=self.stream, flush=True)


# -- commands ----------------------------------------------------------------------------


def follow(
    daemon: Daemon,
    run_id: str,
    view: ProgressView,
    poll: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll the run until it ends, showing its progress; the final document."""
    with view:
        while True:
            doc = daemon.expect("GET", f"/runs/{run_id}", 200)
            if doc.get("state") != "running":
                view.show(doc, final=True)
                return doc
            view.show(doc)
            sleep(poll)


def summary_text(daemon: Daemon, run_id: str) -> str:
    status, body = daemon.request("GET", f"/runs/{run_id}", accept="text/plain")
    return body.decode(errors="replace").rstrip("\n") if status == 200 else ""


def cmd_run(daemon: Daemon, args: argparse.Namespace) -> int:
    query: dict[str, str] = {"mode": args.mode}
    if args.grace:
        query["grace"] = args.grace
    if args.source:
        query["source"] = args.source
    if args.online:
        query["online"] = "true"
    if args.untagged:
        query["untagged"] = "true"
    for name in ("keep_last", "keep_younger_than", "keep_tags", "repositories"):
        if getattr(args, name) is not None:
            query[name] = getattr(args, name)
    for item in args.param or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ClientError(f"--param takes KEY=VALUE, not {item!r}")
        query[key] = value
    run = daemon.expect("POST", "/prune?" + urllib.parse.urlencode(query), 202)
    print(f"run {run['id']} started ({run['mode']}, source {run['source']})", file=sys.stderr)
    view = ProgressView(sys.stderr, interval=args.interval)
    try:
        doc = follow(daemon, run["id"], view, poll=min(1.0, args.interval))
    except KeyboardInterrupt:
        print(
            f"\nstopped following; run {run['id']} goes on "
            f"(registry-pruned stop {run['id']} to stop it)",
            file=sys.stderr,
        )
        return 130
    print(summary_text(daemon, run["id"]))
    if doc.get("state") != "succeeded":
        print(f"error: run {doc['id']} {doc.get('state')}: {doc.get('error')}", file=sys.stderr)
        return 1
    return 0


def cmd_status(daemon: Daemon, _args: argparse.Namespace) -> int:
    status, doc = daemon.json("GET", "/runs/latest")
    if status == 404:
        print("no run yet")
        return 0
    if status != 200:
        raise ClientError(f"GET /runs/latest: {status}: {doc.get('error', doc)}")
    if doc.get("state") == "running":
        print(f"run {doc['id']} ({doc['mode']}) is running")
        print(progress_line(doc, None))
        return 0
    print(f"last run {doc['id']} ({doc['mode']}) {doc['state']} at {doc.get('finished_at')}")
    print(summary_text(daemon, doc["id"]))
    return 0


def _duration(doc: dict[str, Any]) -> str:
    seconds = doc.get("progress", {}).get("elapsed_seconds")
    return f"{seconds:.1f}s" if isinstance(seconds, int | float) else "-"


def cmd_history(daemon: Daemon, _args: argparse.Namespace) -> int:
    runs = daemon.expect("GET", "/runs", 200)
    rows = [("ID", "MODE", "STATE", "STARTED", "DURATION", "BLOBS", "BYTES")]
    for doc in runs:
        summary = doc.get("summary", {})
        rows.append(
            (
                doc["id"],
                doc.get("mode", ""),
                doc.get("state", ""),
                str(doc.get("started_at", "")),
                _duration(doc),
                str(summary.get("blobs", 0)),
                bytes_size(summary.get("bytes", 0)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = zip(row, widths, strict=True)
        print("  ".join(cell.ljust(width) for cell, width in cells).rstrip())
    return 0


def cmd_stop(daemon: Daemon, args: argparse.Namespace) -> int:
    run_id = args.id
    if not run_id:
        running = [r for r in daemon.expect("GET", "/runs", 200) if r.get("state") == "running"]
        if not running:
            print("error: no run is running", file=sys.stderr)
            return 1
        run_id = running[0]["id"]
    doc = daemon.expect("POST", f"/runs/{urllib.parse.quote(run_id)}/stop", 202)
    print(f"asked run {doc['id']} to stop; in-flight batches finish first")
    return 0


COMMANDS = {"run": cmd_run, "status": cmd_status, "history": cmd_history, "stop": cmd_stop}


def add_parsers(sub: Any) -> None:
    """The client's subcommands, on the CLI's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("PRUNER_URL", DEFAULT_URL),
        help=f"the daemon's address (default {DEFAULT_URL}, or PRUNER_URL)",
    )
    common.add_argument(
        "--token",
        default=os.environ.get("PRUNER_TOKEN"),
        help="bearer token when the daemon checks them (or PRUNER_TOKEN)",
    )
    common.add_argument(
        "--token-file",
        default=os.environ.get("PRUNER_TOKEN_FILE"),
        help="read the token from this file at each request, e.g. a projected token",
    )
    run = sub.add_parser(
        "run", parents=[common], help="start a run on a running daemon and follow it"
    )
    run.add_argument("mode", choices=("check", "delete"))
    run.add_argument("--grace", help="e.g. 30m (default: the daemon's)")
    run.add_argument("--source", choices=("storage", "openshift"))
    run.add_argument("--online", action="store_true", help="delete without read-only mode")
    add_revision_flags(run)
    run.add_argument(
        "--param", action="append", metavar="KEY=VALUE", help="any other /prune query option"
    )
    run.add_argument(
        "--interval", type=float, default=5.0, help="seconds between plain progress lines"
    )
    sub.add_parser("status", parents=[common], help="the active or latest run")
    sub.add_parser("history", parents=[common], help="the daemon's runs, newest first")
    stop = sub.add_parser("stop", parents=[common], help="stop the running run (or run ID)")
    stop.add_argument("id", nargs="?")


def main(args: argparse.Namespace) -> int:
    daemon = Daemon(args.url, args.token, token_file=args.token_file)
    try:
        return COMMANDS[args.command](daemon, args)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def local_view(stream: TextIO) -> ProgressView | None:
    """The bar for one-shot check/delete: only when ``stream`` is a terminal."""
    return ProgressView(stream) if stream.isatty() else None


__all__: Sequence[str] = ("ClientError", "Daemon", "ProgressView", "add_parsers", "main")
