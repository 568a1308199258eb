"""Deletes you can undo: a delete run with trash, then a restore, on a store the real registry
wrote; the store is the same key for key and byte for byte, and every tag pulls."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import layout
from tests.conftest import pruned
from tests.harness.daemon import Daemon
from tests.harness.fake_openshift import FakeOpenShift
from tests.harness.images import Scenario, build_scenario, pull_kept, skopeo_pull
from tests.harness.openshift_scenario import Pushed, cluster_for, run_cli
from tests.harness.registry import Registry, blobs_on_disk, running_registry
from tests.test_safety_crash import plant_orphans, wait_for

#: our own bookkeeping (the lease, the trash and its records): not registry data. The
#: comparisons leave it out; each test says what of it must be there or gone
OWN = layout.OWN


def snapshot(registry: Registry) -> dict[str, str]:
    """Every registry key of a filesystem store and the sha256 of its content."""
    v2 = registry.root / layout.V2_ROOT
    return {
        str(path.relative_to(v2)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in v2.rglob("*")
        if path.is_file() and not str(path.relative_to(v2)).startswith(OWN)
    }


def differing(now: dict[str, str], before: dict[str, str]) -> list[str]:
    """Keys missing, added or changed (a short list: pytest's diff of big dicts takes ages)."""
    return sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))[:20]


def run_ids(state: Path) -> list[str]:
    return sorted(p.stem for p in (state / "runs").glob("*.json"))


def pull_all(registry: Registry, scenario: Scenario, where: Path) -> None:
    registry.restart(read_only=False)
    pull_kept(registry.url, scenario.kept, where)


def test_delete_with_trash_then_restore_gives_the_same_store(
    fresh: tuple[Registry, Scenario], tmp_path: Path
) -> None:
    registry, scenario = fresh
    before = snapshot(registry)
    state = tmp_path / "state"
    config = registry.config_path
    args = ("--registry-config", config, "--grace", "0", "--state-dir", state)
    registry.restart(read_only=True)
    # stale uploads go too: whole trees, not only blobs and links
    deleted = pruned("delete", *args, "--trash", "7d", "--upload-max-age", "0")
    assert deleted.returncode == 0, deleted.stderr
    lines = deleted.stdout.splitlines()
    orphans = len(scenario.expected_orphans)
    assert lines[0] == f"Deleted {orphans} blobs"
    assert lines[1].startswith(f"Moved {orphans} blobs (") and " to the trash until " in lines[1]
    assert not any(line.startswith("Freed up") for line in lines)
    assert blobs_on_disk(registry) == scenario.in_use
    after_delete = snapshot(registry)
    assert set(after_delete) < set(before)
    assert not any("/_uploads/" in key for key in after_delete)
    (run_id,) = run_ids(state)
    doc = json.loads((state / "runs" / f"{run_id}.json").read_text())
    summary = doc["summary"]
    assert summary["trashed_bytes"] >= summary["bytes"] > 0
    assert summary["trashed_objects"] == len(set(before) - set(after_delete))
    assert summary["freed_bytes"] == 0
    # the trash keeps each key's relative path; its manifest names every key it moved
    trash = registry.root / layout.V2_ROOT / OWN / "trash" / run_id
    for key in set(before) - set(after_delete):
        assert hashlib.sha256((trash / key).read_bytes()).hexdigest() == before[key], key
    listed = {
        key
        for chunk in (trash / "manifest").glob("*.json")
        for key in json.loads(chunk.read_text())["keys"]
    }
    assert listed == set(before) - set(after_delete)

    restored = pruned("restore", run_id, *args)
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.startswith(f"Run {run_id}: Restored {summary['trashed_objects']} ")
    assert differing(snapshot(registry), before) == []
    doc = json.loads((state / "runs" / f"{run_id}.json").read_text())
    assert doc["state"] == "restored" and doc["restore"]["objects"] == summary["trashed_objects"]
    # idempotent: a second restore changes nothing and says so
    again = pruned("restore", run_id, *args)
    assert again.returncode == 0, again.stderr
    assert differing(snapshot(registry), before) == []
    # what is left of ours is the trash's record, saying it was restored
    left = {p.name for p in (registry.root / layout.V2_ROOT / OWN).rglob("*") if p.is_file()}
    assert left == {"trash.json"}
    pull_all(registry, scenario, tmp_path)


def test_restore_answers_409_without_trash_and_after_a_purge(
    fresh: tuple[Registry, Scenario], tmp_path: Path
) -> None:
    """Expired trash goes at the next delete's start (counted there), not before; a restore
    of a run without trash, or of a purged one, is a 409 with the reason."""
    registry, scenario = fresh
    planted = plant_orphans(registry, 50, seed=17)
    registry.restart(read_only=True)
    daemon = Daemon(registry.config_path, tmp_path / "state", "--grace", "0").start()
    try:
        plain = daemon.json("POST", "/prune?mode=delete&wait=true")[1]
        assert plain["state"] == "succeeded", plain
        status, answer = daemon.json("POST", f"/runs/{plain['id']}/restore")
        assert status == 409 and "without trash" in answer["error"], answer
        planted = plant_orphans(registry, 50, seed=18)
        first = daemon.json("POST", "/prune?mode=delete&wait=true&trash=3s")[1]
        assert first["state"] == "succeeded", first
        assert first["summary"]["trashed_objects"] >= len(planted)
        status, listing = daemon.json("GET", "/trash")
        assert status == 200 and [t["id"] for t in listing] == [first["id"]]
        assert listing[0]["objects"] == first["summary"]["trashed_objects"]
        assert listing[0]["bytes"] == first["summary"]["trashed_bytes"] and listing[0]["expires"]
        # not expired yet: neither the next delete nor a purge touches it
        second = daemon.json("POST", "/prune?mode=delete&wait=true")[1]
        assert second["summary"]["purged_trash_runs"] == 0
        status, purged = daemon.json("POST", "/trash/purge")
        assert status == 200 and purged["purged_runs"] == 0, purged
        assert [t["id"] for t in daemon.json("GET", "/trash")[1]] == [first["id"]]
        time.sleep(3.5)
        third = daemon.json("POST", "/prune?mode=delete&wait=true")[1]
        assert third["state"] == "succeeded", third
        assert third["summary"]["purged_trash_runs"] == 1
        assert third["summary"]["purged_trash_bytes"] == first["summary"]["trashed_bytes"]
        assert daemon.json("GET", "/trash")[1] == []
        status, answer = daemon.json("POST", f"/runs/{first['id']}/restore")
        assert status == 409 and "purged" in answer["error"], answer
    finally:
        daemon.stop()
    assert blobs_on_disk(registry) == scenario.in_use
    trash = registry.root / layout.V2_ROOT / OWN / "trash" / first["id"]
    assert {p.name for p in trash.rglob("*") if p.is_file()} == {"trash.json"}


def test_sigkill_during_the_move_and_during_the_restore(
    fresh: tuple[Registry, Scenario], tmp_path: Path
) -> None:
    """A delete with trash killed mid-move: the next delete puts the dead run's part back
    and moves everything into its own trash, once. A restore killed mid-way: the next restore
    finishes it. Nothing lost, nothing twice."""
    registry, scenario = fresh
    plant_orphans(registry, 6000, seed=99)
    before = snapshot(registry)
    registry.restart(read_only=True)
    state = tmp_path / "state"
    daemon = Daemon(registry.config_path, state, "--grace", "0").start()
    try:
        _status, run = daemon.json("POST", "/prune?mode=delete&trash=7d")
        reached = wait_for(daemon, run["id"], "delete", 1500)
        daemon.terminate(signal.SIGKILL)
    finally:
        daemon.stop()
    assert reached["state"] == "running", reached
    own = registry.root / layout.V2_ROOT / OWN / "trash"
    half = [p for p in (own / run["id"]).rglob("data")]
    assert half, "killed before anything was moved"
    # nothing lost: each key is in place or in the dead run's trash, never in neither
    trashed = {str(p.relative_to(own / run["id"])) for p in (own / run["id"]).rglob("*")}
    assert set(before) <= set(snapshot(registry)) | trashed

    again = Daemon(registry.config_path, state, "--grace", "0").start()
    try:
        final = again.json("POST", "/prune?mode=delete&wait=true&trash=7d")[1]
        assert final["state"] == "succeeded", final
        assert any("interrupted runs had moved aside" in n for n in final["notes"]), final
        assert not (own / run["id"]).exists()  # put back, then moved again by this run
        assert blobs_on_disk(registry) == scenario.in_use
        assert [t["id"] for t in again.json("GET", "/trash")[1]] == [final["id"]]
    finally:
        again.stop()

    # a restore killed mid-way (one-shot CLI), then finished by the next call
    cmd = [
        str(Path(__import__("sys").executable)),
        "-m",
        "daemon",
        "restore",
        final["id"],
        "--registry-config",
        str(registry.config_path),
        "--state-dir",
        str(state),
    ]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)
    meta = own / final["id"] / "trash.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if '"restoring"' in meta.read_text() and len(blobs_on_disk(registry)) > len(
            scenario.in_use
        ):
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert '"restoring"' in meta.read_text(), "the restore ended before the kill"
    assert differing(snapshot(registry), before)
    finished = pruned(
        "restore", final["id"], "--registry-config", registry.config_path, "--state-dir", state
    )
    assert finished.returncode == 0, finished.stderr
    assert differing(snapshot(registry), before) == []
    assert {p.name for p in (own / final["id"]).rglob("*") if p.is_file()} == {"trash.json"}
    pull_all(registry, scenario, tmp_path)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[tuple[Registry, Scenario, Path]]:
    """The standard scenario on a small tmpfs of its own (a real filesystem that fills up:
    CI runs as root, as this machine does), and a filler file's path."""
    mount = tmp_path / "registry"
    storage = mount / "storage"
    storage.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(storage)], check=True)
    try:
        with running_registry(mount) as registry:
            yield registry, build_scenario(registry), storage / "filler"
    finally:
        subprocess.run(["umount", "-l", str(storage)], check=False)


def fill(filler: Path, leave: int = 0) -> None:
    """Write ``filler`` until the filesystem is full, then give back ``leave`` bytes."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 4096):  # megabytes, then the last pages
            while True:
                try:
                    if os.write(fd, b"\0" * size) < size:
                        break
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))


def test_delete_with_trash_on_a_full_filesystem_fails_closed(
    full_disk: tuple[Registry, Scenario, Path], tmp_path: Path
) -> None:
    registry, scenario, filler = full_disk
    before = snapshot(registry)
    registry.restart(read_only=True)
    state = tmp_path / "state"
    args = ("--registry-config", registry.config_path, "--grace", "0", "--state-dir", state)
    own = registry.root / layout.V2_ROOT / OWN
    # full to the last page, then with a few pages free: the run stops where the store
    # refuses a write (the lease, the trash's record, a manifest chunk), says so, loses nothing
    for leave in (0, 2 * 4096, 4 * 4096):
        fill(filler, leave)
        result = pruned("delete", *args, "--trash", "7d", "--upload-max-age", "0")
        assert result.returncode == 1, (leave, result.stdout, result.stderr)
        assert "No space left on device" in result.stderr, (leave, result.stderr)
        trashed = {
            str(p.relative_to(t)): hashlib.sha256(p.read_bytes()).hexdigest()
            for t in own.glob("trash/*")
            for p in t.rglob("*")
            if p.is_file() and not str(p.relative_to(t)).startswith(("manifest/", "trash.json"))
        }
        now = snapshot(registry)
        assert {**now, **trashed} == before, leave  # each key in place or in a trash, intact
        assert scenario.in_use <= blobs_on_disk(registry)
    filler.unlink()
    done = pruned("delete", *args, "--trash", "7d", "--upload-max-age", "0")
    assert done.returncode == 0, done.stderr
    assert blobs_on_disk(registry) == scenario.in_use
    newest = run_ids(state)[-1]
    restored = pruned("restore", newest, *args)
    assert restored.returncode == 0, restored.stderr
    assert differing(snapshot(registry), before) == []


async def test_openshift_delete_with_trash_moves_whole_repositories_and_links_then_restore(
    openshift_store: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    """The openshift source removes whole repositories and revision links: they go to the
    trash too, and come back with their tags."""
    registry, images = openshift_store
    cluster = cluster_for(images, skip={"app2"})
    before = snapshot(registry)
    state = tmp_path / "state"
    env = {"PRUNER_STATE_DIR": str(state)}
    async with FakeOpenShift(cluster) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        code, out, err = await run_cli(
            registry, "delete", "--trash", "7d", kubeconfig=kubeconfig, env=env
        )
    assert code == 0, err
    assert "to the trash until" in out and "Deleted 2 repositories" in out, out
    repos = registry.root / layout.V2_ROOT / "repositories"
    assert not (repos / "ns2/gone/_manifests").exists()
    (run_id,) = run_ids(state)
    trash = registry.root / layout.V2_ROOT / OWN / "trash" / run_id
    app2 = images["app2"].manifest.digest[7:]
    assert (trash / layout.revision_dir("ns1/app", app2) / "link").is_file()
    assert list((trash / "repositories/ns2/gone/_manifests/tags").glob("*/current/link"))
    restored = pruned("restore", run_id, "--registry-config", registry.config_path, env=env)
    assert restored.returncode == 0, restored.stderr
    assert differing(snapshot(registry), before) == []
    for i, name in enumerate(("app1", "app2", "gone", "web")):
        p = images[name]
        skopeo_pull(registry.url, p.repo, p.tag, tmp_path / f"pull{i}")
