"""Podman with its own storage, and the two images of issue 23: a debootstrap base and ours.

No registry is reachable from these machines, so the base is Debian bookworm from the
mirror apt already uses (debootstrap, imported with ``podman import``), and the image is
built on it with ``--build-arg PYTHON_IMAGE``. Everything podman keeps lives under one
directory (the cache home) that this module owns; it is reused between runs on the same
machine to save the base and the build's layers, and rebuilt whenever it is missing or
unusable, so nothing depends on it.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
# ca-certificates beyond the list: the official python base has it, and the daemon
# talks TLS to object stores and the cluster's API
BASE_PACKAGES = ("python3", "python3-venv", "curl", "ca-certificates")
# Dropped from the rootfs before import: the .debs and indexes debootstrap leaves, docs and
# translations (copyright files stay), as Debian's slim images do. Part of the cache key.
_TRIM = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)
_TRIM_BUT_COPYRIGHT = "usr/share/doc"
_TRIM_VERSION = 2
# podman on this kernel (cgroup v1, restricted rlimits, no systemd): issue 23's settings
CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""
# Inside the build: where the host's CA bundle and the generated pip.conf are mounted.
BUILD_CA = "/etc/ssl/certs/ca-certificates.crt"
BUILD_PIP_CONF = "/etc/pip.conf"
# pip settings that only say how to reach the index; local paths (find-links, file: indexes,
# constraints) mean nothing inside the build and stay out.
_PIP_NETWORK_KEYS = (
    "index-url",
    "extra-index-url",
    "trusted-host",
    "proxy",
    "timeout",
    "default-timeout",
    "retries",
)


class PodmanError(RuntimeError):
    """A podman, debootstrap or build step failed; the message carries its output."""


def default_home() -> Path:
    """Where podman's storage and the base live between runs (``REGISTRY_PRUNED_PODMAN_HOME``)."""
    explicit = os.environ.get("REGISTRY_PRUNED_PODMAN_HOME")
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "registry-pruned" / "podman"


def _run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = True,
    stdin: Any = subprocess.DEVNULL,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(c) for c in cmd],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if check and proc.returncode != 0:
        raise PodmanError(
            f"{' '.join(map(str, cmd[:6]))} ... exited with {proc.returncode}:\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


class Podman:
    """``podman --runtime runc`` whose storage, run state and config all live under ``home``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.conf = home / "containers.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def command(self, *args: str | os.PathLike[str]) -> list[str]:
        """The full podman command line for ``args``."""
        return [
            "podman",
            "--root",
            str(self.home / "root"),
            "--runroot",
            str(self.home / "run"),
            "--tmpdir",
            str(self.home / "tmp"),
            "--runtime",
            "runc",
            *map(str, args),
        ]

    def __call__(
        self, *args: str | os.PathLike[str], timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return _run(self.command(*args), env=self.env, timeout=timeout, check=check)

    def prepare(self) -> None:
        """Write the config; start over from an empty home if podman cannot use this one."""
        for attempt in range(2):
            self.home.mkdir(parents=True, exist_ok=True)
            if not self.conf.is_file() or self.conf.read_text() != CONTAINERS_CONF:
                # replaced whole: a concurrent run's podman never reads half a file
                partial = self.home / f"containers.conf.{os.getpid()}"
                partial.write_text(CONTAINERS_CONF)
                partial.replace(self.conf)
            if self("image", "ls", "-q", timeout=120, check=False).returncode == 0:
                return
            if attempt == 0:
                self.reset()
        raise PodmanError(f"podman cannot use {self.home}: {self('info', check=False).stderr}")

    def reset(self) -> None:
        """Remove every container, image and layer under ``home`` (not ``podman system
        reset``: that also drops the machine's network configs, which are not ours)."""
        shutil.rmtree(self.home, ignore_errors=True)

    def image_exists(self, ref: str) -> bool:
        return self("image", "exists", ref, check=False).returncode == 0

    def image_size(self, ref: str) -> int:
        """The image's size in bytes, as ``podman images`` counts it (all layers, unpacked)."""
        return int(self("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip())

    def import_rootfs(self, rootfs: Path, ref: str) -> None:
        """``tar -C rootfs -c . | podman import - ref``."""
        with subprocess.Popen(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
        ) as tar:
            _run(self.command("import", "-", ref), env=self.env, stdin=tar.stdout)
            assert tar.stdout is not None
            tar.stdout.close()
        if tar.returncode != 0:
            raise PodmanError(f"tar of {rootfs} exited with {tar.returncode}")

    def remove_other_tags(self, repository: str, keep: str, older_than: float) -> None:
        """Drop this repository's other tags older than ``older_than`` seconds; their layers
        go with them unless a kept image shares them. Best effort: an image that a concurrent
        run's container or image uses stays."""
        out = self("images", "--format", "{{.Repository}}:{{.Tag}}", repository).stdout
        for ref in out.split():
            if ref == keep:
                continue
            created = self("image", "inspect", "--format", "{{.Created.Unix}}", ref, check=False)
            if created.returncode == 0 and time.time() - int(created.stdout) > older_than:
                self("rmi", ref, check=False)
        # builder-stage layers are no image's parents: they go after a day (the dependency
        # layer is then downloaded again once)
        self("image", "prune", "--force", "--filter", "until=24h", check=False)

    @contextlib.contextmanager
    def container(self, image: str, *run_args: str, args: Sequence[str] = ()) -> Iterator[str]:
        """A detached container of ``image`` (``podman run -d run_args image args``), removed
        with its anonymous volumes afterwards. Yields its name."""
        name = f"registry-pruned-test-{uuid.uuid4().hex[:12]}"
        try:
            self("run", "-d", "--name", name, *run_args, image, *args, timeout=120)
            yield name
        finally:
            self("rm", "--force", "--volumes", "--time", "2", name, timeout=120, check=False)

    def exec(self, container: str, *cmd: str, timeout: float = 60) -> str:
        """``podman exec container cmd``'s stdout; an error if it fails."""
        return self("exec", container, *cmd, timeout=timeout).stdout

    def logs(self, container: str) -> str:
        proc = self("logs", container, check=False)
        return proc.stdout[-4000:] + proc.stderr[-4000:]


# --- where things come from, read from this machine's own configuration -------------------


def apt_mirror(suite: str = SUITE, apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt already uses for ``suite`` (deb822 ``.sources`` or ``.list``)."""
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = _deb822(stanza)
                if (
                    "deb" in fields.get("types", "").split()
                    and suite in fields.get("suites", "").split()
                    and fields.get("enabled", "yes") != "no"
                ):
                    return fields["uris"].split()[0].rstrip("/")
        elif path.name == "sources.list" or path.suffix == ".list":
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                    return words[1].rstrip("/")
    raise PodmanError(f"no 'deb' source for {suite} in /etc/apt/sources.list(.d)")


def _deb822(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in stanza.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line[0].isspace() and key:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            fields[key] = value.strip()
    return fields


def host_pip_settings() -> dict[str, str]:
    """pip's settings on this machine, as pip applies them: ``global`` < a command's section <
    ``PIP_*`` variables (``pip config list`` shows each file's values already merged)."""
    out = _run([sys.executable, "-m", "pip", "config", "list"], timeout=60).stdout
    rank = {"global": 0, ":env:": 2}
    chosen: dict[str, tuple[int, str]] = {}
    for line in out.splitlines():
        match = re.match(r"^(?P<section>[^.=]*)\.(?P<key>[^=]+)=(?P<value>.*)$", line)
        if not match:
            continue
        section, key = match["section"], match["key"]
        if section not in rank and section not in ("wheel", "install", "download"):
            continue
        value = str(ast.literal_eval(match["value"]))
        level = rank.get(section, 1)
        if key not in chosen or level >= chosen[key][0]:
            chosen[key] = (level, value)
    return {key: value for key, (_level, value) in chosen.items()}


def build_pip_conf(settings: dict[str, str], with_ca: bool) -> str:
    """A pip.conf for the build: how to reach the index, and the mounted CA bundle."""
    lines = ["[global]"]
    for key in _PIP_NETWORK_KEYS:
        value = settings.get(key)
        if key.endswith("index-url") and value:
            # file: indexes are paths on this machine, not in the build
            value = " ".join(u for u in value.split() if not u.startswith("file:"))
        if value:
            lines.append(f"{key} = {value}")
    if with_ca:
        lines.append(f"cert = {BUILD_CA}")
    return "\n".join(lines) + "\n"


def host_ca_bundle(settings: dict[str, str]) -> Path | None:
    """The CA bundle pip trusts here (its ``cert``), else the system's; None if there is none."""
    for candidate in (settings.get("cert"), os.environ.get("SSL_CERT_FILE"), BUILD_CA):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


# --- the base: debootstrap + podman import, cached by what goes into it --------------------


def release_digest(mirror: str, suite: str = SUITE) -> str:
    """sha256 of the suite's InRelease: it changes whenever the archive's packages do."""
    with urllib.request.urlopen(f"{mirror}/dists/{suite}/InRelease", timeout=60) as resp:
        return hashlib.sha256(resp.read()).hexdigest()


def base_key(mirror: str, release: str) -> str:
    """What the base is made of, hashed: the cache key (its image tag)."""
    recipe = {
        "suite": SUITE,
        "variant": "minbase",
        "packages": BASE_PACKAGES,
        "mirror": mirror,
        "release": release,
        "trim": [*_TRIM, _TRIM_BUT_COPYRIGHT, _TRIM_VERSION],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def debootstrap(rootfs: Path, mirror: str) -> None:
    """A minimal bookworm with Python, venv and curl in ``rootfs``, trimmed."""
    shutil.rmtree(rootfs, ignore_errors=True)
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            SUITE,
            rootfs,
            mirror,
        ],
        timeout=900,
    )
    for rel in _TRIM:
        for child in (rootfs / rel).glob("*"):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    for child in (rootfs / _TRIM_BUT_COPYRIGHT).glob("*/*"):
        if child.name != "copyright":
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class Built:
    """What building took: the refs, the seconds of each step, whether the base was cached."""

    base: str = ""
    image: str = ""
    base_cached: bool = False
    image_cached: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


def ensure_base(podman: Podman, built: Built) -> str:
    """The base image's ref, made (debootstrap + import) unless this home already has it."""
    mirror = apt_mirror()
    ref = f"localhost/bookworm-python:{base_key(mirror, release_digest(mirror))}"
    with _locked(podman.home / "base.lock"):
        # under the lock, a rootfs left here is from a run that died while making it
        for stale in podman.home.glob("rootfs-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if podman.image_exists(ref):
            built.base_cached = True
        else:
            rootfs = podman.home / f"rootfs-{os.getpid()}"
            try:
                start = time.monotonic()
                debootstrap(rootfs, mirror)
                built.seconds["debootstrap"] = time.monotonic() - start
                start = time.monotonic()
                podman.import_rootfs(rootfs, ref)
                built.seconds["import"] = time.monotonic() - start
            finally:
                shutil.rmtree(rootfs, ignore_errors=True)
        # the bases of earlier releases, once no image is built on them any more
        podman.remove_other_tags("localhost/bookworm-python", keep=ref, older_than=3600)
    built.base = ref
    return ref


def context_digest(context: Path) -> str:
    """sha256 over what the Containerfile copies (and the Containerfile itself)."""
    digest = hashlib.sha256()
    files = [context / "Containerfile", context / "pyproject.toml"]
    files += sorted(
        p
        for p in (context / "daemon").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    for path in files:
        digest.update(str(path.relative_to(context)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_image(podman: Podman, base: str, built: Built, context: Path = ROOT) -> str:
    """Build the Containerfile on ``base``; the tag names the base and the sources, so runs
    of the same code share it and layers are reused."""
    tag = hashlib.sha256((base + context_digest(context)).encode()).hexdigest()[:16]
    ref = f"localhost/registry-pruned:{tag}"
    built.image = ref
    if podman.image_exists(ref):
        built.image_cached = True
        return ref
    settings = host_pip_settings()
    ca = host_ca_bundle(settings)
    pip_conf = podman.home / f"pip-{os.getpid()}.conf"
    pip_conf.write_text(build_pip_conf(settings, with_ca=ca is not None))
    volumes = [f"--volume={pip_conf}:{BUILD_PIP_CONF}:ro"]
    if ca is not None:
        volumes.append(f"--volume={ca}:{BUILD_CA}:ro")
    start = time.monotonic()
    try:
        podman(
            "build",
            "--format=docker",  # keeps the HEALTHCHECK
            "--layers",
            "--network=host",
            f"--build-arg=PYTHON_IMAGE={base}",
            *volumes,
            f"--tag={ref}",
            f"--file={context / 'Containerfile'}",
            context,
            timeout=1200,
        )
    finally:
        pip_conf.unlink(missing_ok=True)
    built.seconds["build"] = time.monotonic() - start
    # images of older sources pile up otherwise; an hour leaves concurrent runs theirs
    podman.remove_other_tags("localhost/registry-pruned", keep=ref, older_than=3600)
    return ref
