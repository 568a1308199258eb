"""Run ``registry-pruned serve`` as a real process on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness.registry import free_port

ROOT = Path(__file__).resolve().parents[2]


class Daemon:
    def __init__(
        self, config: Path | None, state_dir: Path, *args: str, env: dict[str, str] | None = None
    ) -> None:
        """``config`` None: no --registry-config (``args`` say where the storage comes from)."""
        self.config = config
        self.state_dir = state_dir
        self.args = args
        self.env = env or {}
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir.parent / f"daemon-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Daemon:
        cmd = [
            sys.executable,
            "-m",
            "daemon",
            "serve",
            *(["--registry-config", str(self.config)] if self.config is not None else []),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--state-dir",
            str(self.state_dir),
            "--log-level",
            "debug",
            *self.args,
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log.read_text()[-3000:]}")
            # Another suite's daemon may answer on this port before ours fails to bind: only
            # our own process holding the listening socket proves the port is ours.
            if self._listening():
                try:
                    self.get("/healthz")
                    return self
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()  # a daemon that never became ours must not outlive the attempt
        raise RuntimeError("daemon did not answer /healthz")

    def _listening(self) -> bool:
        """Whether our process holds the listening socket on our port (Linux /proc)."""
        assert self.proc is not None
        inodes: set[str] = set()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(table) as rows:
                for row in list(rows)[1:]:
                    fields = row.split()
                    # local address "HEX:PORT", state 0A is LISTEN, inode is field 9
                    if (
                        int(fields[1].rsplit(":", 1)[1], 16) == self.port
                        and fields[3] == "0A"
                        and fields[9] in inodes
                    ):
                        return True
        return False

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, timeout: float = 60
    ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.url + path, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def get(self, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, **kw)

    def json(self, method: str, path: str) -> tuple[int, Any]:
        status, _headers, body = self.request(method, path)
        return status, json.loads(body)

    def wait_done(self, run_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _status, doc = self.json("GET", f"/runs/{run_id}")
            if doc["state"] != "running":
                return doc
            time.sleep(0.05)
        raise TimeoutError(f"run {run_id} still running")

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def restart_finishes(
    config: Path, state: Path, run_id: str, env: dict[str, str] | None = None
) -> None:
    """A daemon started again on ``state`` marks the killed run ``run_id`` interrupted, and a
    new delete run then finishes."""
    again = Daemon(config, state, "--grace", "0", env=env).start()
    try:
        runs = again.json("GET", "/runs")[1]
        assert runs[0]["id"] == run_id and runs[0]["state"] == "interrupted"
        _status, final = again.json("POST", "/prune?mode=delete&wait=true")
        assert final["state"] == "succeeded", final
    finally:
        again.stop()
