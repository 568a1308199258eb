"""SIGKILL the daemon at several points of a delete run; a restart and a new run finish the job."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.harness.daemon import Daemon, restart_finishes
from tests.harness.images import Scenario, pull_kept
from tests.harness.registry import Registry, blobs_on_disk

OLD = time.time() - 7200


def plant_orphans(registry: Registry, count: int, seed: int) -> set[str]:
    """Blobs no manifest references, written as the registry writes them, two hours old."""
    rng = random.Random(seed)
    base = registry.root / "docker/registry/v2/blobs/sha256"
    out = set()
    for _ in range(count):
        data = rng.randbytes(64)
        hexd = hashlib.sha256(data).hexdigest()
        path = base / hexd[:2] / hexd / "data"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (OLD, OLD))
        out.add("sha256:" + hexd)
    return out


PHASES = ["guard", "scan-repositories", "mark", "sweep", "delete"]


def wait_for(daemon: Daemon, run_id: str, phase: str, deleted: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = daemon.json("GET", f"/runs/{run_id}")[1]
        progress = doc["progress"]
        if doc["state"] != "running":
            return doc
        # phases can be shorter than a poll: kill at the first moment at or past the point
        current = PHASES.index(doc["phase"]) if doc["phase"] in PHASES else -1
        if current >= PHASES.index(phase) and progress["deleted"] >= deleted:
            return doc
        time.sleep(0.002)
    raise TimeoutError(f"never reached {phase}")


# (phase to wait for, deleted count to wait for): before anything is deleted, at the first
# batch, and in the middle of the deletions
KILL_POINTS = [("mark", 0), ("delete", 0), ("delete", 1), ("delete", 4000)]


@pytest.mark.parametrize(("phase", "deleted"), KILL_POINTS)
def test_sigkill_mid_delete_then_restart_finishes(
    fresh: tuple[Registry, Scenario], tmp_path: Path, phase: str, deleted: int
) -> None:
    registry, scenario = fresh
    planted = plant_orphans(registry, 8_000, seed=len(phase) + deleted)
    registry.restart(read_only=True)
    state = tmp_path / "state"
    daemon = Daemon(registry.config_path, state, "--grace", "0").start()
    try:
        status, run = daemon.json("POST", "/prune?mode=delete")
        assert status == 202, run
        reached = wait_for(daemon, run["id"], phase, deleted)
        daemon.terminate(signal.SIGKILL)
    finally:
        daemon.stop()
    assert reached["state"] == "running", reached  # killed mid-run, not after
    # nothing in use went, whatever the moment of the kill
    assert scenario.in_use <= blobs_on_disk(registry)
    restart_finishes(registry.config_path, state, run["id"])
    assert blobs_on_disk(registry) == scenario.in_use
    assert not planted & blobs_on_disk(registry)
    assert registry.garbage_collect(dry_run=True) == set()
    registry.restart(read_only=False)
    pull_kept(registry.url, scenario.kept, tmp_path)
