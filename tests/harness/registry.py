"""Start and stop Debian's ``docker-registry`` (distribution 2.8) on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

REGISTRY_BINARY = "docker-registry"
# `docker-registry garbage-collect` prints one such line per unmarked blob (2.8 format).
_ELIGIBLE = re.compile(r"^blob eligible for deletion: (sha256:[0-9a-f]{64})\s*$", re.MULTILINE)


class RegistryError(RuntimeError):
    """The registry process failed to start, died, or a command it ran failed."""


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def registry_available() -> bool:
    """True when the ``docker-registry`` binary is on PATH."""
    return shutil.which(REGISTRY_BINARY) is not None


class Registry:
    """One ``docker-registry serve`` process with its own config file, log and storage."""

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        s3: Mapping[str, Any] | None = None,
        read_only: bool = False,
        schema1: bool = True,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 15.0,
    ) -> None:
        """Prepare (but do not start) a registry; storage is filesystem unless ``s3`` is given."""
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="registry-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.s3 = dict(s3) if s3 is not None else None
        self.read_only = read_only
        self.schema1 = schema1
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.port = 0
        self.log_path = self.workdir / "registry.log"
        self._config_path = self.workdir / "config.yml"
        self._root = None if self.s3 is not None else self.workdir / "storage"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:<port>``."""
        return f"http://{self.host}"

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``, as used in ``docker://`` references."""
        return f"127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        """The registry's config.yml (the daemon under test reads the same file)."""
        return self._config_path

    @property
    def root(self) -> Path:
        """The filesystem storage rootdirectory; an error for S3 storage."""
        if self._root is None:
            raise RegistryError("an S3-backed registry has no filesystem root")
        return self._root

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config(self) -> dict[str, Any]:
        """The configuration document written to ``config_path``."""
        storage: dict[str, Any]
        if self.s3 is not None:
            s3: dict[str, Any] = {"secure": False, "forcepathstyle": True, "v4auth": True}
            s3.update(self.s3)
            storage = {"s3": s3}
        else:
            storage = {"filesystem": {"rootdirectory": str(self.root)}}
        storage["delete"] = {"enabled": True}
        maintenance: dict[str, Any] = {"uploadpurging": {"enabled": False}}
        if self.read_only:
            maintenance["readonly"] = {"enabled": True}
        storage["maintenance"] = maintenance
        doc: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "formatter": "text"},
            "storage": storage,
            # A fixed secret keeps upload state valid across restarts of this registry.
            "http": {"addr": self.host, "secret": "registry-pruned-tests"},
        }
        if self.schema1:
            doc["compatibility"] = {"schema1": {"enabled": True}}
        return doc

    def write_config(self) -> Path:
        """Write ``config_path`` for the current port and flags."""
        if self._root is not None:
            self._root.mkdir(parents=True, exist_ok=True)
        self._config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        return self._config_path

    def child_env(self) -> dict[str, str]:
        """The environment docker-registry runs with."""
        env = dict(os.environ)
        # The Go AWS SDK in docker-registry panics with a CA bundle and a plain-http endpoint.
        env.pop("AWS_CA_BUNDLE", None)
        # Overrides from the caller's environment would make the config file lie.
        for key in list(env):
            if key.startswith("REGISTRY_"):
                del env[key]
        # ...unless the test sets them on purpose (e.g. the operator's REGISTRY_STORAGE_*).
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        """Start the registry and wait until ``GET /v2/`` answers."""
        if self.running:
            return
        last_error = ""
        # A free port can be taken between probing and binding: try a few.
        for _ in range(3):
            if self.port == 0 or not self._port_free(self.port):
                self.port = free_port()
            self.write_config()
            self._log_file = self.log_path.open("ab")
            self._proc = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(self._config_path)],
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.child_env(),
            )
            try:
                self._wait_ready()
                return
            except RegistryError as exc:
                last_error = str(exc)
                self._terminate()
                self.port = 0
        raise RegistryError(last_error)

    @staticmethod
    def _port_free(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # Go listens with SO_REUSEADDR, so our own TIME_WAIT sockets do not block a restart.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RegistryError(
                    f"docker-registry exited with {self._proc.returncode}: {self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/v2/", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RegistryError(f"docker-registry not ready in {self.startup_timeout}s")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the registry's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        """Stop the registry process (storage is kept)."""
        self._terminate()

    def restart(self, read_only: bool | None = None) -> None:
        """Restart on the same port, optionally switching read-only mode."""
        if read_only is not None:
            self.read_only = read_only
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop and remove the working directory if this object created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def garbage_collect_output(self, dry_run: bool = True, delete_untagged: bool = False) -> str:
        """Run ``docker-registry garbage-collect`` on this config; stdout and stderr merged."""
        if not self._config_path.exists():
            self.write_config()
        cmd = [REGISTRY_BINARY, "garbage-collect"]
        if dry_run:
            cmd.append("--dry-run")
        if delete_untagged:
            cmd.append("--delete-untagged")
        cmd.append(str(self._config_path))
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.child_env(),
            timeout=120,
            check=False,
        )
        text = proc.stdout.decode(errors="replace")
        if proc.returncode != 0:
            raise RegistryError(f"garbage-collect exited with {proc.returncode}:\n{text[-4000:]}")
        return text

    def garbage_collect(self, dry_run: bool = True, delete_untagged: bool = False) -> set[str]:
        """Digests that garbage-collect reports as ``blob eligible for deletion``."""
        text = self.garbage_collect_output(dry_run=dry_run, delete_untagged=delete_untagged)
        return set(_ELIGIBLE.findall(text))

    def __enter__(self) -> Registry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        kind = "s3" if self.s3 is not None else "filesystem"
        return f"<Registry {self.url} {kind} read_only={self.read_only}>"


@contextlib.contextmanager
def running_registry(
    workdir: str | os.PathLike[str] | None = None,
    *,
    s3: Mapping[str, Any] | None = None,
    read_only: bool = False,
    schema1: bool = True,
    env: Mapping[str, str] | None = None,
) -> Iterator[Registry]:
    """Yield a started registry; stop it (and remove its own temp dir) afterwards."""
    registry = Registry(workdir, s3=s3, read_only=read_only, schema1=schema1, env=env)
    try:
        registry.start()
        yield registry
    finally:
        registry.cleanup()


def blobs_on_disk(registry: Registry) -> set[str]:
    """Digests of every blob with data in a filesystem registry's store."""
    base = registry.root / "docker/registry/v2/blobs/sha256"
    return {"sha256:" + p.parent.name for p in base.glob("*/*/data")}
