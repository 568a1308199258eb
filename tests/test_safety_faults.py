"""Storage faults on the filesystem, a full state directory, and two daemons on one store."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TypeVar

import pytest

from daemon import layout
from daemon.logs import make_logger
from daemon.progress import Progress
from daemon.prune import DELETE, Engine, RunFailed, RunOptions
from daemon.sources.storage import StorageSource
from daemon.storage.base import BlobEntry, DeleteFailure, StorageError
from daemon.storage.filesystem import FilesystemStorage
from tests.harness.daemon import Daemon
from tests.harness.images import Scenario
from tests.harness.registry import Registry, blobs_on_disk
from tests.test_safety_crash import plant_orphans

P = TypeVar("P")

ROOT = Path(__file__).resolve().parent.parent
NO_CAPS = ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--ambient-caps", "-all"]


def pruned_without_privileges(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as root without CAP_DAC_*: file permissions apply to it as to anyone."""
    return subprocess.run(
        [*NO_CAPS, sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "where",
    [
        "blobs/sha256/{shard}",
        "repositories/app/_manifests/revisions/sha256",
        "repositories/team/sub/app/_layers/sha256",
        "repositories/team",
    ],
)
def test_unreadable_directory_fails_closed(fresh: tuple[Registry, Scenario], where: str) -> None:
    registry, scenario = fresh
    registry.restart(read_only=True)
    orphan = sorted(scenario.expected_orphans)[0][7:]
    target = registry.root / "docker/registry/v2" / where.format(shard=orphan[:2])
    before = blobs_on_disk(registry)
    os.chmod(target, 0)
    try:
        result = pruned_without_privileges(
            "delete", "--registry-config", str(registry.config_path), "--grace", "0"
        )
    finally:
        os.chmod(target, 0o755)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Permission denied" in result.stderr and str(target) in result.stderr
    assert blobs_on_disk(registry) == before


class Vanishing(FilesystemStorage):
    """Removes each listed orphan's data as its shard is swept (a racing collector)."""

    def __init__(self, root: str, doomed: set[str]) -> None:
        super().__init__(root, 4)
        self.doomed = doomed

    async def _vanish(self, shard: str) -> None:
        # the blob directories stay listed; their data is gone before the driver stats it
        for entry in await self.list_blob_shard(shard):
            if entry.hex in self.doomed:
                os.unlink(self.base / layout.blob_data(entry.hex))

    async def blobs_outside(
        self, shard: str, members: AbstractSet[bytes]
    ) -> tuple[int, list[BlobEntry]]:
        await self._vanish(shard)
        return await super().blobs_outside(shard, members)

    async def blobs_outside_sized(
        self, shard: str, members: AbstractSet[bytes]
    ) -> tuple[int, list[BlobEntry], bytes]:
        # a check's sweep with per-repository usage takes this way
        await self._vanish(shard)
        return await super().blobs_outside_sized(shard, members)


async def test_files_vanishing_between_list_and_use(fresh: tuple[Registry, Scenario]) -> None:
    registry, scenario = fresh
    doomed = {d[7:] for d in scenario.expected_orphans}
    storage = Vanishing(str(registry.root), doomed)
    log = make_logger("warning")
    engine = Engine(storage, StorageSource(4, log), RunOptions(grace=0), Progress(), log=log)
    summary = await engine.run()
    # the blobs went away by themselves: none is a candidate, none is counted as freed
    assert summary.blobs == 0 and summary.too_young == len(doomed)
    await storage.close()


class ReaderKiller(FilesystemStorage):
    """SIGKILLs a reader process (the OOM killer, say) when the mark starts reading."""

    def __init__(self, root: str) -> None:
        super().__init__(root, 4)
        self.reads = 0
        self.killed: list[int] = []

    async def read_parsed(
        self, keys: Sequence[str], limit: int, parse: Callable[[bytes], P]
    ) -> list[P | ValueError | None]:
        self.reads += 1
        if self.reads == 1 and self._processes is not None:
            pid = next(iter(self._processes._processes))  # type: ignore[attr-defined]
            os.kill(pid, signal.SIGKILL)
            self.killed.append(pid)
        return await super().read_parsed(keys, limit, parse)


async def test_a_reader_process_killed_mid_mark_fails_the_run_and_deletes_nothing(
    fresh: tuple[Registry, Scenario],
) -> None:
    registry, scenario = fresh
    before = blobs_on_disk(registry)
    storage = ReaderKiller(str(registry.root))
    log = make_logger("warning")
    options = RunOptions(mode=DELETE, grace=0, registry_read_only=True)
    try:
        engine = Engine(storage, StorageSource(4, log), options, Progress(), log=log)
        with pytest.raises(RunFailed, match="reader process ended unexpectedly"):
            await engine.run()
        assert storage.killed and blobs_on_disk(registry) == before
        # the same driver starts new readers: the next run deletes what it should
        engine = Engine(storage, StorageSource(4, log), options, Progress(), log=log)
        summary = await engine.run()
        assert len(storage.killed) == 1
        assert summary.blobs == len(scenario.expected_orphans)
        assert blobs_on_disk(registry) == before - scenario.expected_orphans
        # a reader that dies between runs costs nothing: the next run starts new ones
        pool = storage._processes
        assert pool is not None
        for pid in list(pool._processes):  # type: ignore[attr-defined]
            os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if pool._broken:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.05)
        assert pool._broken  # type: ignore[attr-defined]
        engine = Engine(storage, StorageSource(4, log), RunOptions(grace=0), Progress(), log=log)
        summary = await engine.run()
        assert storage._processes is not pool and summary.blobs == 0
        assert summary.too_young == 0 and engine.progress.manifests > 0
    finally:
        await storage.close()


class Recording(FilesystemStorage):
    """Logs when each layer link is gone and when each blob's deletion starts; refuses to
    delete the layer links of ``refused``."""

    def __init__(self, root: str, refused: str) -> None:
        super().__init__(root, 4)
        self.refused = refused
        self.events: list[tuple[str, str]] = []
        self.inflight = self.peak = 0

    async def delete_trees(self, prefixes: Sequence[str]) -> list[DeleteFailure]:
        if all(p.startswith(layout.BLOBS) for p in prefixes):
            return await super().delete_trees(prefixes)  # delete_blobs' own work
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            await asyncio.sleep(0.02)  # a slow store: the other batch gets its turn
            kept = [p for p in prefixes if self.refused in p]
            failures = [DeleteFailure(p, "refused by the test") for p in kept]
            gone = [p for p in prefixes if p not in kept]
            failures += await super().delete_trees(gone)
            self.events += [("link", p.rstrip("/").rsplit("/", 1)[-1]) for p in gone]
            return failures
        finally:
            self.inflight -= 1

    async def delete_blobs(self, hexes: Sequence[str]) -> list[DeleteFailure]:
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        self.events += [("blob", h) for h in hexes]
        try:
            await asyncio.sleep(0.02)
            return await super().delete_blobs(hexes)
        finally:
            self.inflight -= 1


async def test_batches_overlap_but_each_blob_goes_after_its_links(
    fresh: tuple[Registry, Scenario],
) -> None:
    registry, scenario = fresh
    kept = blobs_on_disk(registry) - scenario.expected_orphans
    planted = sorted(plant_orphans(registry, 2600, seed=5))  # three batches of up to 1000
    linked = [d[7:] for d in planted[::7]]
    for hexd in linked:
        for repo in ("app", "team/sub/app"):
            link = registry.root / "docker/registry/v2" / layout.layer_link_dir(repo, hexd)
            link.mkdir(parents=True)
            (link / "link").write_text("sha256:" + hexd)
    refused = linked[len(linked) // 2]
    storage = Recording(str(registry.root), refused)
    log = make_logger("warning")
    options = RunOptions(mode=DELETE, grace=0, registry_read_only=True)
    engine = Engine(storage, StorageSource(4, log), options, Progress(), log=log)
    with pytest.raises(RunFailed, match="2 deletes failed"):
        await engine.run()
    await storage.close()
    assert storage.peak == 2  # one batch's links went while another's blobs did
    order = {event: i for i, event in enumerate(storage.events)}
    for hexd in linked:
        if hexd != refused:
            assert order[("link", hexd)] < order[("blob", hexd)]
    # the blob whose links could not all go stays, with its surviving links: none dangles
    assert ("blob", refused) not in order
    assert blobs_on_disk(registry) == kept | {"sha256:" + refused}
    summary = engine.summary
    assert summary.blobs == len(planted) + len(scenario.expected_orphans) - 1
    assert summary.failed == 2
    v2 = registry.root / "docker/registry/v2"
    for hexd in linked:
        on_disk = [(v2 / layout.layer_link_dir(r, hexd)).exists() for r in ("app", "team/sub/app")]
        assert on_disk == [hexd == refused] * 2


@pytest.fixture
def tiny_state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "tiny"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(state)], check=True)
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_full_state_directory_fails_clearly_and_never_corrupts(
    fresh: tuple[Registry, Scenario], tiny_state: Path
) -> None:
    registry, _scenario = fresh
    plant_orphans(registry, 3000, seed=11)  # 3000 candidate lines do not fit in 48 KiB
    daemon = Daemon(registry.config_path, tiny_state, "--grace", "0").start()
    try:
        status, doc = daemon.json("GET", "/prune?mode=check&wait=true")
        assert status == 200 and doc["state"] == "failed", doc
        assert "No space left on device" in doc["error"]
        assert "state directory" in doc["error"]
        assert daemon.json("GET", "/healthz")[0] == 200
    finally:
        daemon.stop()
    runs = tiny_state / "runs"
    for path in runs.iterdir():
        assert not path.name.startswith("."), path  # no temporary file left behind
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            for line in path.read_text().splitlines():
                json.loads(line)  # whole lines only


def test_second_daemon_on_the_same_store_cannot_delete_while_the_first_does(
    fresh: tuple[Registry, Scenario], tmp_path: Path
) -> None:
    registry, scenario = fresh
    planted = plant_orphans(registry, 20_000, seed=12)
    registry.restart(read_only=True)
    first = Daemon(registry.config_path, tmp_path / "a", "--grace", "0").start()
    second = Daemon(registry.config_path, tmp_path / "b", "--grace", "0").start()
    try:
        status, run = first.json("POST", "/prune?mode=delete")
        assert status == 202
        deadline = time.monotonic() + 30
        while first.json("GET", f"/runs/{run['id']}")[1]["phase"] in ("starting", "guard"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, refused = second.json("GET", "/prune?mode=check&wait=true")
        assert refused["state"] == "succeeded"  # checks never need the lease
        status, refused = second.json("POST", "/prune?mode=delete&wait=true")
        assert refused["state"] == "failed", refused
        assert "holds this store's delete lease" in refused["error"]
        assert first.wait_done(run["id"])["state"] == "succeeded"
        status, after = second.json("POST", "/prune?mode=delete&wait=true")
        assert after["state"] == "succeeded"  # the lease was released
    finally:
        first.stop()
        second.stop()
    assert not planted & blobs_on_disk(registry)
    assert scenario.in_use <= blobs_on_disk(registry)


async def test_racing_leases_leave_one_holder(fresh: tuple[Registry, Scenario]) -> None:
    from daemon.lease import Lease, LeaseHeld

    registry, _scenario = fresh
    stores = [FilesystemStorage(str(registry.root), 2) for _ in range(5)]
    leases = [Lease(s, f"run{i}", settle=0.3) for i, s in enumerate(stores)]
    results = await asyncio.gather(*(lease.acquire() for lease in leases), return_exceptions=True)
    winners = [r for r in results if r is None]
    assert len(winners) == 1, results
    assert all(isinstance(r, LeaseHeld) for r in results if r is not None)
    assert all(lease.atomic for lease in leases)  # flock: no settle time needed
    for lease in leases:
        await lease.release()
    for s in stores:
        await s.close()


class SlowWrites(FilesystemStorage):
    """A store without conditional writes whose PUTs take longer than the old fixed
    settle time (0.5 s)."""

    def __init__(self, root: str, delay: float) -> None:
        super().__init__(root, 2)
        self.delay = delay

    async def conditional_writes(self) -> bool:
        return False

    async def write(self, key: str, data: bytes) -> None:
        await asyncio.sleep(self.delay)
        await super().write(key, data)


async def test_racing_leases_on_a_slow_store_without_conditional_writes(
    fresh: tuple[Registry, Scenario],
) -> None:
    """Write, settle, read is mutual exclusion only when the settle time outlasts a racer's
    write: here writes take 0.8 s and the second racer starts 0.6 s after the first."""
    from daemon.lease import Lease, LeaseHeld

    registry, _scenario = fresh
    stores = [SlowWrites(str(registry.root), 0.8) for _ in range(2)]
    leases = [Lease(s, f"run{i}") for i, s in enumerate(stores)]

    async def late(lease: Lease) -> None:
        await asyncio.sleep(0.6)
        await lease.acquire()

    results = await asyncio.gather(leases[0].acquire(), late(leases[1]), return_exceptions=True)
    assert [r is None for r in results].count(True) == 1, results
    assert all(isinstance(r, LeaseHeld) for r in results if r is not None)
    assert all(not lease.atomic for lease in leases)
    settled = [lease.settled for lease in leases]
    assert min(settled) >= 3 * 0.8, settled  # three times the measured write and read
    for lease in leases:
        await lease.release()
    for s in stores:
        await s.close()


class LeaseWritesFail(FilesystemStorage):
    """Takes the lease, then cannot write it again; each batch of blobs takes 0.3 s."""

    def __init__(self, root: str) -> None:
        super().__init__(root, 2)
        self.lease_writes = 0

    async def write_if(self, key: str, data: bytes, version: str | None) -> str:
        self.lease_writes += 1
        if self.lease_writes > 1:
            raise StorageError(f"cannot write {key}: Input/output error (injected)")
        return await super().write_if(key, data, version)

    async def delete_blobs(self, hexes: Sequence[str]) -> list[DeleteFailure]:
        await asyncio.sleep(0.3)
        return await super().delete_blobs(hexes)


async def test_a_holder_that_cannot_renew_its_lease_stops_deleting(
    fresh: tuple[Registry, Scenario],
) -> None:
    """Past its ttl another pruner may take the lease over: the holder must have stopped."""
    registry, scenario = fresh
    planted = plant_orphans(registry, 8000, seed=14)  # 9 batches, 0.3 s each at least
    storage = LeaseWritesFail(str(registry.root))
    log = make_logger("error")
    options = RunOptions(mode=DELETE, grace=0, registry_read_only=True, lease_ttl=1.2)
    engine = Engine(storage, StorageSource(4, log), options, Progress(), log=log)
    with pytest.raises(RunFailed, match="lost the store's delete lease"):
        await engine.run()
    await storage.close()
    assert storage.lease_writes >= 2  # renewals were tried, and failed
    assert engine.lease is not None and engine.lease.lost.is_set()
    left = blobs_on_disk(registry)
    assert planted & left, "every batch went: the holder never noticed its lease expired"
    assert scenario.in_use <= left


def test_blobs_parked_by_a_dead_online_run_go_back(
    fresh: tuple[Registry, Scenario], tmp_path: Path
) -> None:
    """An online run killed between parking and deciding leaves blobs aside; none is lost."""
    from tests.conftest import pruned
    from tests.harness.images import pull_kept

    registry, scenario = fresh
    v2 = registry.root / "docker/registry/v2"
    parked = sorted(scenario.in_use)[:5]
    for digest in parked:
        hexd = digest[7:]
        target = v2 / "_registry-pruned/trash/dead-run" / layout.blob_data(hexd)
        target.parent.mkdir(parents=True, exist_ok=True)
        (v2 / layout.blob_data(hexd)).rename(target)
    # what a parking run writes before its first move: it was moving when it died
    (v2 / "_registry-pruned/trash/dead-run/trash.json").write_text('{"state": "moving"}')
    registry.restart(read_only=True)
    result = pruned("delete", "--registry-config", registry.config_path, "--grace", "0")
    assert result.returncode == 0, result.stderr
    assert "put back blobs a stopped run had parked" in result.stderr
    assert blobs_on_disk(registry) == scenario.in_use
    assert not (v2 / "_registry-pruned").exists()
    registry.restart(read_only=False)
    pull_kept(registry.url, scenario.kept, tmp_path)


def test_read_only_flag_is_read_again_for_every_delete(
    fresh: tuple[Registry, Scenario], tmp_path: Path
) -> None:
    """The registry's config is a mounted ConfigMap: it changes under a running daemon."""
    registry, scenario = fresh
    before = blobs_on_disk(registry)
    daemon = Daemon(registry.config_path, tmp_path / "state", "--grace", "0").start()
    try:
        status, refused = daemon.json("POST", "/prune?mode=delete&wait=true")
        assert status == 409 and "not in read-only mode" in refused["error"], refused
        registry.restart(read_only=True)  # the daemon is not restarted
        _status, run = daemon.json("POST", "/prune?mode=delete&wait=true")
        assert run["state"] == "succeeded", run
        assert run["summary"]["blobs"] == len(scenario.expected_orphans)
        registry.restart(read_only=False)
        status, refused = daemon.json("POST", "/prune?mode=delete&wait=true")
        assert status == 409 and "not in read-only mode" in refused["error"], refused
        registry.config_path.write_text("storage: [not, a, mapping]\n")
        _status, run = daemon.json("POST", "/prune?mode=delete&wait=true")
        assert run["state"] == "failed", run
        assert "cannot tell whether the registry is read-only" in run["error"], run
    finally:
        daemon.stop()
    assert blobs_on_disk(registry) == before - scenario.expected_orphans
