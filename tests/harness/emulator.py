"""What the Azurite and fake-gcs-server harnesses share: the process, and copying a store
written by the real registry on a filesystem into a container and back, object for object."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from daemon import layout
from tests.harness.registry import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


class EmulatorError(RuntimeError):
    """The emulator could not be found, started or used."""


class Emulator(ABC):
    """One emulator process on a free loopback port; ``with`` or ``start()``/``stop()``."""

    name = "emulator"

    def __init__(self, startup_timeout: float = 60.0) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.startup_timeout = startup_timeout
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @abstractmethod
    def command(self) -> list[str]:
        """The argv that serves on ``self.port``."""

    @abstractmethod
    def ready_url(self) -> str:
        """A URL that answers (any HTTP status) once the emulator serves."""

    def start(self) -> Emulator:
        self.port = free_port()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.process.poll() is not None:
                raise EmulatorError(f"{self.name} exited: {self.log_tail()}")
            try:
                urllib.request.urlopen(self.ready_url(), timeout=2).close()
                return self
            except urllib.error.HTTPError:
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmulatorError(f"{self.name} not ready: {self.log_tail()}") from None
                time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cpu_seconds(self) -> float:
        """CPU time the emulator process has used so far (user + system)."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- objects: what each emulator's client does -------------------------------------------

    @abstractmethod
    def create(self, container: str) -> str:
        """Create a bucket/container; its name."""

    @abstractmethod
    def put(self, container: str, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, container: str, key: str) -> bytes: ...

    @abstractmethod
    def keys(self, container: str, prefix: str = "") -> list[str]:
        """Every key below ``prefix``, sorted."""

    # -- stores ------------------------------------------------------------------------------

    def copy_in(self, store: Path, container: str, rootdirectory: str = "") -> int:
        """Every file of the filesystem store below ``store`` (the registry's rootdirectory)
        as an object under ``rootdirectory``; how many."""
        base = store / layout.V2_ROOT
        prefix = f"{rootdirectory.strip('/')}/" if rootdirectory.strip("/") else ""
        files = [p for p in base.rglob("*") if p.is_file()]
        _each(
            files,
            lambda p: self.put(
                container,
                f"{prefix}{layout.V2_ROOT}/{p.relative_to(base).as_posix()}",
                p.read_bytes(),
            ),
        )
        return len(files)

    def copy_out(self, container: str, store: Path, rootdirectory: str = "") -> int:
        """Every object below ``rootdirectory`` into a fresh filesystem store at ``store``."""
        prefix = f"{rootdirectory.strip('/')}/" if rootdirectory.strip("/") else ""
        if store.exists():
            shutil.rmtree(store)
        keys = [k for k in self.keys(container, prefix) if not k.endswith("/")]

        def one(key: str) -> None:
            path = store / key[len(prefix) :]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.get(container, key))

        _each(keys, one)
        return len(keys)


def _each(items: Sequence[object], fn: Callable[..., None]) -> None:
    with ThreadPoolExecutor(16) as pool:
        for _ in pool.map(fn, items):
            pass
