"""Shared fixtures: real docker-registry stores with the standard scenario pushed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.harness.azurite import Azurite
from tests.harness.emulator import Emulator
from tests.harness.fakegcs import FakeGCS
from tests.harness.images import Scenario, build_scenario
from tests.harness.openshift_scenario import openshift_store  # noqa: F401 - a shared fixture
from tests.harness.registry import Registry, running_registry

# one-shot CLI runs record themselves in a state directory (default ./state): every process
# the tests start gets one outside the checkout, unless a test names its own
os.environ.setdefault("PRUNER_STATE_DIR", tempfile.mkdtemp(prefix="registry-pruned-state-"))


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[tuple[Registry, Scenario]]:
    """A registry of its own with the standard scenario: for tests that change the store."""
    with running_registry(tmp_path / "registry") as registry:
        yield registry, build_scenario(registry)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Scenario]]:
    """One registry per module with the standard scenario: for tests that only read."""
    with running_registry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry, build_scenario(registry)


@pytest.fixture(scope="module")
def emulators() -> Iterator[dict[str, Emulator]]:
    """Azurite and fake-gcs-server, one of each per module: "azure" and "gcs"."""
    with Azurite() as azurite, FakeGCS() as fake_gcs:
        yield {"azure": azurite, "gcs": fake_gcs}


def pruned(
    *args: str | os.PathLike[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (``python -m daemon``) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "daemon", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).resolve().parent.parent,
    )


DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def would_delete(stderr: str) -> set[str]:
    """The digests of a check's ``Would delete blob: ...`` log lines."""
    return {
        m.group(0)
        for line in stderr.splitlines()
        if "Would delete blob" in line
        for m in [DIGEST.search(line)]
        if m
    }


def check_logged(config: str | os.PathLike[str], *args: str) -> subprocess.CompletedProcess[str]:
    """A check with grace 0 that logs one text line per candidate (and per tag or manifest)."""
    return pruned(
        "check",
        "--registry-config",
        config,
        "--grace",
        "0",
        "--log-level",
        "info",
        "--log-format",
        "text",
        *args,
    )


def synthetic_store(root: Path, blobs: int, repositories: int, seed: int) -> Path:
    """A synthetic store in distribution's layout under ``root`` (bench/synth.py) and a
    registry config naming it: for runs long enough to watch."""
    from bench.synth import generate, plan_for

    generate(plan_for(root / "store", blobs, repositories, 5, 0.1, seed=seed))
    config = root / "config.yml"
    config.write_text(
        yaml.safe_dump({"storage": {"filesystem": {"rootdirectory": str(root / "store")}}})
    )
    return config
