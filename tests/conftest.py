"""Shared fixtures: real docker-registry stores with the standard scenario pushed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.images import Scenario, build_scenario
from tests.harness.openshift_scenario import openshift_store  # noqa: F401 - a shared fixture
from tests.harness.registry import Registry, running_registry


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
