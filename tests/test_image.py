"""Our image, built here on a debootstrap base, answers the documented one-liner (issue 23).

The container is run as manifests/kubernetes/pruner-sidecar.yaml runs it (args, env, mount
paths, read-only root, no capabilities), on a store the real registry wrote.
`registry-pruned run check` inside the container waits for that client (issue 18).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.units import bytes_size
from tests.harness.images import Scenario
from tests.harness.podman import (
    Built,
    Podman,
    apt_mirror,
    build_image,
    build_pip_conf,
    default_home,
    ensure_base,
    host_pip_settings,
)
from tests.harness.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
SIDECAR = ROOT / "manifests/kubernetes/pruner-sidecar.yaml"
OPENSHIFT_UID = "1000870000"  # an arbitrary uid of a namespace's range, in group 0


@pytest.fixture(scope="module")
def podman() -> Podman:
    podman = Podman(default_home())
    podman.prepare()
    return podman


@pytest.fixture(scope="module")
def image(podman: Podman, request: pytest.FixtureRequest) -> str:
    """The image's ref; builds the base and the image unless this machine has them."""
    built = Built()
    start = time.monotonic()
    ensure_base(podman, built)
    build_image(podman, built.base, built)
    total = time.monotonic() - start
    size = podman.image_size(built.image)
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in built.seconds.items())
    report = (
        f"image {built.image}: {size / 1e6:.1f} MB; image step {total:.1f} s "
        f"(base {'cached' if built.base_cached else 'built'}, "
        f"image {'cached' if built.image_cached else 'built'}{'; ' + steps if steps else ''})"
    )
    # in CI's log whatever the capture mode: the figures bench/README.md records
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n{report}")
    return built.image


def sidecar() -> dict[str, Any]:
    """The pruner container of the Kubernetes manifest."""
    doc = yaml.safe_load(SIDECAR.read_text())
    (container,) = [c for c in doc["spec"]["template"]["spec"]["containers"]]
    return container


def mount_path(container: dict[str, Any], volume: str) -> str:
    return next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume)


@pytest.fixture(scope="module")
def store(shared: tuple[Registry, Scenario], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared store aged past the default grace period, and a copy of the registry's
    config that names the manifest's storage mount path. Returns the config's path."""
    registry, _scenario = shared
    aged = time.time() - 2 * 3600
    for path in registry.root.rglob("*"):
        os.utime(path, (aged, aged), follow_symlinks=False)
    config = registry.config()
    config["storage"]["filesystem"]["rootdirectory"] = mount_path(sidecar(), "registry-storage")
    path = tmp_path_factory.mktemp("image-config") / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_args(config: Path, registry: Registry, user: str | None) -> list[str]:
    """``podman run`` options that do what the manifest's container spec does."""
    spec = sidecar()
    args = ["--network=none"]
    for item in spec["env"]:
        args.append(f"--env={item['name']}={item['value']}")
    config_mount = next(m for m in spec["volumeMounts"] if m["name"] == "registry-config")
    args.append(f"--volume={config}:{config_mount['mountPath']}:ro")
    # read-only: a check must write nothing into the store
    args.append(f"--volume={registry.root}:{mount_path(spec, 'registry-storage')}:ro")
    security = spec["securityContext"]
    if security.get("readOnlyRootFilesystem"):
        # as the kubelet does: podman would mount a writable tmpfs on /tmp, Kubernetes does not
        args += ["--read-only", "--read-only-tmpfs=false"]
    if security.get("allowPrivilegeEscalation") is False:
        args.append("--security-opt=no-new-privileges")
    args += [f"--cap-drop={cap}" for cap in security["capabilities"]["drop"]]
    if user is not None:
        args.append(f"--user={user}")
    return args


@pytest.fixture
def start(
    podman: Podman, image: str, store: Path, shared: tuple[Registry, Scenario]
) -> Iterator[Any]:
    """Start the image as the sidecar (optionally as ``user``); wait for /healthz."""
    registry, _scenario = shared
    containers = contextlib.ExitStack()

    def started(user: str | None = None) -> str:
        name = containers.enter_context(
            podman.container(image, *run_args(store, registry, user), args=sidecar()["args"])
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            probe = podman(
                "exec",
                name,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "localhost:8099/healthz",
                check=False,
            )
            if probe.stdout == "200":
                return name
            state = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            if state != "true":
                raise AssertionError(f"the container exited; logs:\n{podman.logs(name)}")
            time.sleep(0.2)
        raise AssertionError(f"no /healthz in 60 s; logs:\n{podman.logs(name)}")

    with containers:
        yield started


PACKAGE_DIGESTS = (
    "import daemon, hashlib, json, pathlib; root = pathlib.Path(daemon.__file__).parent; "
    "print(json.dumps({str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() "
    "for p in root.rglob('*.py')}))"
)


def package_digests(root: Path) -> dict[str, str]:
    """sha256 of each module under ``root``, by relative path (what PACKAGE_DIGESTS prints)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*.py")
    }


def expected_summary(registry: Registry, scenario: Scenario) -> tuple[int, str]:
    """The orphans' total size, and the text summary that must name them."""
    blobs = registry.root / "docker/registry/v2/blobs/sha256"
    total = sum((blobs / d[7:9] / d[7:] / "data").stat().st_size for d in scenario.expected_orphans)
    # the scenario's uploads are minutes old: kept, and said so with the limit
    uploads = len(scenario.uploads)
    kept = f"{uploads} upload{'s' if uploads != 1 else ''}"
    text = (
        f"Would delete {len(scenario.expected_orphans)} blobs\n"
        f"Would free up {bytes_size(total)} of disk space\n"
        + (
            f"Kept {kept} younger than the upload age limit (--upload-max-age 24h)\n"
            if uploads
            else ""
        )
        + "Use mode=delete to actually delete the data\n"
    )
    return total, text


def test_one_liner_in_the_image(
    podman: Podman, start: Any, shared: tuple[Registry, Scenario]
) -> None:
    registry, scenario = shared
    container = start()
    uid = podman.exec(container, "id", "-u").strip()
    assert uid != "0" and uid == "1001"
    # the installed package is this checkout's daemon/, file for file
    installed = json.loads(podman.exec(container, "python", "-c", PACKAGE_DIGESTS))
    assert installed == package_digests(ROOT / "daemon")
    # the image's HEALTHCHECK command, run once
    assert podman("healthcheck", "run", container, check=False).returncode == 0

    started = json.loads(podman.exec(container, "curl", "-s", "localhost:8099/prune?mode=check"))
    assert started["mode"] == "check" and started["state"] in ("running", "succeeded")
    deadline = time.monotonic() + 120
    while True:
        doc = json.loads(podman.exec(container, "curl", "-s", "localhost:8099/runs/latest"))
        if doc["state"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert doc["id"] == started["id"] and doc["state"] == "succeeded", doc
    total, text = expected_summary(registry, scenario)
    assert doc["summary"]["blobs"] == len(scenario.expected_orphans)
    assert doc["summary"]["bytes"] == total and doc["summary"]["too_young"] == 0
    summary = podman.exec(
        container, "curl", "-s", "-H", "Accept: text/plain", "localhost:8099/runs/latest"
    )
    assert summary == text
    candidates = podman.exec(container, "curl", "-s", "localhost:8099/runs/latest/candidates")
    lines = [json.loads(line) for line in candidates.splitlines()]
    assert {line["digest"] for line in lines} == scenario.expected_orphans
    # the client next to the one-liner (`oc exec ... -- registry-pruned run check`): a pipe
    # here, so plain progress lines, then the same summary; exit 0 on succeeded
    followed = podman.exec(container, "registry-pruned", "run", "check")
    assert followed.strip() == text.strip(), followed


def test_arbitrary_uid_in_group_0(
    podman: Podman, start: Any, shared: tuple[Registry, Scenario]
) -> None:
    registry, scenario = shared
    container = start(f"{OPENSHIFT_UID}:0")
    assert podman.exec(container, "id", "-u").strip() == OPENSHIFT_UID
    assert podman.exec(container, "id", "-g").strip() == "0"
    summary = podman.exec(
        container,
        "curl",
        "-s",
        "-H",
        "Accept: text/plain",
        "localhost:8099/prune?mode=check&wait=true",
    )
    assert summary == expected_summary(registry, scenario)[1]
    # the run's history was written to the state dir, and the daemon is still up
    state_dir = next(e["value"] for e in sidecar()["env"] if e["name"] == "PRUNER_STATE_DIR")
    assert podman.exec(container, "ls", "-A", state_dir).split()
    running = podman("inspect", "--format", "{{.State.Running}}", container).stdout.strip()
    assert running == "true"
    assert podman.exec(container, "curl", "-s", "localhost:8099/healthz")
    # as PID 1 it still ends on SIGTERM, cleanly, well before the kill (the kubelet's stop)
    podman("stop", "--time", "20", container, timeout=60)
    exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip()
    assert exit_code == "0", podman.logs(container)


# --- what the build takes from this machine's configuration (no podman needed) -------------


def test_apt_mirror_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
    )
    assert apt_mirror("bookworm", tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list.d/debian.sources").unlink()
    (tmp_path / "sources.list").write_text(
        "deb [signed-by=/k.gpg] http://other.example/debian bookworm main\n"
    )
    assert apt_mirror("bookworm", tmp_path) == "http://other.example/debian"
    assert apt_mirror("bookworm", Path("/etc/apt")).startswith(("http://", "https://"))


def test_build_pip_conf_keeps_only_how_to_reach_the_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PIP_* variables win over the config files, as in pip itself
    monkeypatch.setenv("PIP_INDEX_URL", "https://pypi.mirror.invalid/simple")
    settings = host_pip_settings()
    assert settings["index-url"] == "https://pypi.mirror.invalid/simple"
    settings = {
        "index-url": "https://pypi.mirror.invalid/simple",
        "extra-index-url": "file:///opt/pypi/simple https://extra.invalid/simple",
        "find-links": "/opt/wheels",
        "constraint": "/etc/xdg/pip/constraints.txt",
        "cert": "/somewhere/ca.pem",
        "default-timeout": "180",
    }
    assert build_pip_conf(settings, with_ca=True) == (
        "[global]\n"
        "index-url = https://pypi.mirror.invalid/simple\n"
        "extra-index-url = https://extra.invalid/simple\n"
        "default-timeout = 180\n"
        "cert = /etc/ssl/certs/ca-certificates.crt\n"
    )
