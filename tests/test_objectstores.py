"""Azure Blob (Azurite) and Google Cloud Storage (fake-gcs-server): a store the real registry
wrote on a filesystem, copied object for object into each emulator, pruned there."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from daemon import layout
from daemon.logs import make_logger
from daemon.progress import Progress
from daemon.prune import CHECK, DELETE, Candidate, Engine, RunFailed, RunOptions
from daemon.sources.storage import StorageSource
from daemon.storage.azure import AzureStorage
from daemon.storage.gcs import GCSStorage
from daemon.storage.objectstore import ObjectStore, RetryPolicy
from tests.conftest import check_logged, pruned, would_delete
from tests.harness.azurite import Azurite
from tests.harness.daemon import Daemon, restart_finishes
from tests.harness.emulator import Emulator
from tests.harness.fakegcs import FakeGCS
from tests.harness.faultproxy import FaultProxy
from tests.harness.images import Scenario, pull_kept
from tests.harness.registry import Registry, running_registry
from tests.test_safety_crash import wait_for

PARTS = ["azure", "gcs"]
FAST = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05, read_timeout=5.0)
ROOT = "reg/root"


@pytest.fixture(scope="module")
def reference(shared: tuple[Registry, Scenario]) -> tuple[set[str], set[str]]:
    """The filesystem original's candidates, and garbage-collect --dry-run's."""
    registry, scenario = shared
    result = check_logged(registry.config_path)
    assert result.returncode == 0, result.stderr
    collected = registry.garbage_collect(dry_run=True)
    assert collected == scenario.expected_orphans
    return would_delete(result.stderr), collected


def seeded(emulator: Emulator, registry: Registry, purpose: str) -> str:
    """A new container/bucket holding a copy of the registry's store under ROOT."""
    name = emulator.create(f"{purpose}-{uuid.uuid4().hex[:10]}")
    assert emulator.copy_in(registry.root, name, ROOT) > 0
    return name


def config_file(
    emulator: Emulator, name: str, where: Path, read_only: bool = False, **extra: Any
) -> Path:
    root = str(extra.pop("rootdirectory", ROOT))
    doc = emulator.registry_config(name, root, **extra)  # type: ignore[attr-defined]
    if read_only:
        doc["storage"]["maintenance"] = {"readonly": {"enabled": True}}
    path = where / f"{name}-{uuid.uuid4().hex[:6]}.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def cli_env(emulator: Emulator, url: str | None = None) -> dict[str, str]:
    return emulator.env(url) if isinstance(emulator, FakeGCS) else {}


def blobs_in(emulator: Emulator, name: str) -> set[str]:
    prefix = f"{ROOT}/{layout.V2_ROOT}/{layout.BLOBS}"
    return {
        "sha256:" + key.split("/")[-2]
        for key in emulator.keys(name, prefix)
        if key.endswith("/data")
    }


def driver(emulator: Emulator, name: str, url: str | None = None) -> ObjectStore:
    settings = emulator.settings(name, ROOT, url)  # type: ignore[attr-defined]
    kind = AzureStorage if isinstance(emulator, Azurite) else GCSStorage
    return kind(settings, 8, FAST)


@pytest.mark.parametrize("part", PARTS)
def test_check_matches_filesystem_and_garbage_collect(
    part: str,
    emulators: dict[str, Emulator],
    shared: tuple[Registry, Scenario],
    reference: tuple[set[str], set[str]],
    tmp_path: Path,
) -> None:
    registry, scenario = shared
    emulator = emulators[part]
    name = seeded(emulator, registry, "check")
    before = emulator.keys(name)
    config = config_file(emulator, name, tmp_path)
    logged = ["--grace", "0", "--log-level", "info", "--log-format", "text"]
    result = pruned("check", "--registry-config", config, *logged, env=cli_env(emulator))
    assert result.returncode == 0, result.stderr
    filesystem, collected = reference
    ours = would_delete(result.stderr)
    assert ours == filesystem == collected == scenario.expected_orphans
    assert result.stdout.splitlines()[0] == f"Would delete {len(collected)} blobs"
    assert emulator.keys(name) == before  # a check changes nothing


@pytest.mark.parametrize("part", PARTS)
def test_delete_then_every_kept_reference_pulls(
    part: str, emulators: dict[str, Emulator], shared: tuple[Registry, Scenario], tmp_path: Path
) -> None:
    registry, scenario = shared
    emulator = emulators[part]
    name = seeded(emulator, registry, "delete")
    config = config_file(emulator, name, tmp_path, read_only=True)
    args = ["--registry-config", config, "--grace", "0", "--upload-max-age", "0"]
    result = pruned("delete", *args, env=cli_env(emulator))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"Deleted {len(scenario.expected_orphans)} blobs"
    # in batches: Azurite reads a Blob Batch whose boundary is a token (azure.token_boundary)
    assert "batch deletes refused" not in result.stderr
    assert blobs_in(emulator, name) == scenario.in_use
    # back onto a filesystem: the real registry serves what is left, every kept image whole
    workdir = tmp_path / "restored"
    assert emulator.copy_out(name, workdir / "storage", ROOT) > 0
    with running_registry(workdir) as restored:
        assert restored.garbage_collect(dry_run=True) == set()
        pull_kept(restored.url, scenario.kept, tmp_path)
    again = pruned("check", *args, env=cli_env(emulator))
    assert again.stdout.splitlines()[0] == "Would delete 0 blobs", again.stderr


def is_listing(request: web.Request) -> bool:
    """Azure's List Blobs or GCS's objects.list."""
    if request.method != "GET":
        return False
    return request.query.get("comp") == "list" or request.path.endswith("/o")


def is_blob_read(request: web.Request) -> bool:
    """A GET of one object's content (Azure: no sub-resource; GCS: alt=media)."""
    if request.method != "GET" or is_listing(request):
        return False
    if "/storage/v1/" in request.path:
        return request.query.get("alt") == "media"
    return "comp" not in request.query and "restype" not in request.query


def is_delete(request: web.Request) -> bool:
    """Azure's Delete Blob / Blob Batch, GCS's objects.delete / JSON batch."""
    return request.method == "DELETE" or (
        request.method == "POST"
        and ("batch" in request.path or "comp=batch" in request.query_string)
    )


async def run_engine(
    storage: ObjectStore,
    mode: str,
    stream: io.StringIO | None = None,
    run_id: str = "",
    dead_runs: frozenset[str] = frozenset(),
) -> tuple[list[Candidate], Any]:
    log = make_logger("warning", "json", stream or sys.stderr).bind(run_id="fault-run")
    found: list[Candidate] = []
    options = RunOptions(mode=mode, grace=0, upload_max_age=0, registry_read_only=True)
    engine = Engine(
        storage,
        StorageSource(4, log),
        options,
        Progress(),
        on_candidate=found.append,
        log=log,
        run_id=run_id,
        dead_runs=dead_runs,
    )
    return found, await engine.run()


@pytest.mark.parametrize("part", PARTS)
def test_a_small_store_lists_its_blobs_once_and_a_second_ask_lists_afresh(
    part: str, emulators: dict[str, Emulator], shared: tuple[Registry, Scenario]
) -> None:
    registry, _scenario = shared
    emulator = emulators[part]
    name = seeded(emulator, registry, "flat")
    stored = blobs_in(emulator, name)

    def listings(proxy: FaultProxy) -> int:
        return sum(
            1
            for s in proxy.seen
            if s.method == "GET"
            and ("comp=list" in s.path_qs or s.path_qs.partition("?")[0].endswith("/o"))
        )

    async def scenario_run() -> None:
        async with FaultProxy(emulator.host_url) as proxy:  # type: ignore[attr-defined]
            storage = driver(emulator, name, proxy.url)
            try:
                storage.warm_up()  # a run starts
                listed = set()
                for shard in layout.SHARDS:
                    found = await storage.list_blob_shard(shard)
                    listed |= {"sha256:" + entry.hex for entry in found}
                    assert all(entry.hex.startswith(shard) for entry in found)
                assert listed == stored
                # the store fits in one page: one listing of blobs/, not 256
                assert listings(proxy) == 1
                # a shard is served from that page once: asked again, it is listed again
                data = b"a blob written after the listing"
                digest = hashlib.sha256(data).hexdigest()
                emulator.put(name, f"{ROOT}/{layout.V2_ROOT}/{layout.blob_data(digest)}", data)
                again = await storage.list_blob_shard(digest[:2])
                assert digest in {entry.hex for entry in again}
                assert listings(proxy) == 2
            finally:
                await storage.close()

    asyncio.run(scenario_run())


@pytest.mark.parametrize("part", PARTS)
def test_faults_while_marking_give_the_same_answer_or_fail_closed(
    part: str, emulators: dict[str, Emulator], shared: tuple[Registry, Scenario]
) -> None:
    registry, scenario = shared
    emulator = emulators[part]
    name = seeded(emulator, registry, "faults")
    before = emulator.keys(name)

    async def scenario_run() -> None:
        async with FaultProxy(emulator.host_url) as proxy:  # type: ignore[attr-defined]
            storage = driver(emulator, name, proxy.url)
            try:
                proxy.inject("slowdown", 2, match=is_listing)
                proxy.inject("internal", 1, match=is_listing)
                proxy.inject("reset", 1, match=is_listing)
                proxy.inject("delay", 1, match=is_listing, delay=6.0)  # beyond the read timeout
                proxy.inject("slowdown", 1, match=is_blob_read)
                proxy.inject("reset", 1, match=is_blob_read)
                proxy.inject("internal", 1, match=is_blob_read)
                logged = io.StringIO()
                found, summary = await run_engine(storage, CHECK, logged)
                assert {layout.format_digest(c.digest) for c in found} == scenario.expected_orphans
                assert summary.blobs == len(scenario.expected_orphans)
                assert sum(proxy.injected.values()) == 8
                retried = [json.loads(line) for line in logged.getvalue().splitlines()]
                retried = [e for e in retried if e["event"] == f"{part} request retried"]
                assert retried and all(e["run_id"] == "fault-run" for e in retried)
                # throttled for good: the run fails before anything is deleted
                proxy.clear()
                proxy.inject("slowdown", None, match=is_blob_read)
                with pytest.raises(RunFailed, match="after 5 attempts"):
                    await run_engine(storage, DELETE)
                proxy.clear()
                proxy.inject("internal", None, match=is_listing)
                with pytest.raises(RunFailed, match="after 5 attempts"):
                    await run_engine(storage, DELETE)
            finally:
                await storage.close()

    asyncio.run(scenario_run())
    assert emulator.keys(name) == before


@pytest.mark.parametrize("part", PARTS)
def test_faults_while_deleting_keep_what_is_in_use_and_a_rerun_finishes(
    part: str, emulators: dict[str, Emulator], shared: tuple[Registry, Scenario]
) -> None:
    registry, scenario = shared
    emulator = emulators[part]
    name = seeded(emulator, registry, "deletefaults")

    async def scenario_run() -> None:
        async with FaultProxy(emulator.host_url) as proxy:  # type: ignore[attr-defined]
            storage = driver(emulator, name, proxy.url)
            try:
                proxy.inject("slowdown", 2, match=is_delete)
                proxy.inject("reset_after", 1, match=is_delete)
                proxy.inject("internal", None, match=is_delete)
                with pytest.raises(RunFailed):
                    await run_engine(storage, DELETE, run_id="failed-run")
                assert scenario.in_use <= blobs_in(emulator, name)
                proxy.clear()
                proxy.inject("slowdown", 3, match=is_delete)
                proxy.inject("reset", 1, match=is_delete)
                # the failed run could not release its lease (its delete failed too): the
                # daemon knows it dead, as it knows its own finished runs
                await run_engine(storage, DELETE, dead_runs=frozenset({"failed-run"}))
            finally:
                await storage.close()

    asyncio.run(scenario_run())
    assert blobs_in(emulator, name) == scenario.in_use


@pytest.mark.parametrize("part", PARTS)
def test_sigkill_mid_delete_then_a_run_finishes(
    part: str, emulators: dict[str, Emulator], shared: tuple[Registry, Scenario], tmp_path: Path
) -> None:
    registry, scenario = shared
    emulator = emulators[part]
    name = seeded(emulator, registry, "crash")
    # orphans no manifest references, enough for the delete to be under way when killed
    planted = set()
    for i in range(1500):
        data = f"orphan {part} {i}".encode()
        digest = hashlib.sha256(data).hexdigest()
        planted.add("sha256:" + digest)
        emulator.put(name, f"{ROOT}/{layout.V2_ROOT}/{layout.blob_data(digest)}", data)
    config = config_file(emulator, name, tmp_path, read_only=True)
    state = tmp_path / "state"
    env = cli_env(emulator)
    daemon = Daemon(config, state, "--grace", "0", env=env).start()
    try:
        status, run = daemon.json("POST", "/prune?mode=delete")
        assert status == 202, run
        # an emulator on a busy 2-core machine can take a while to get there
        reached = wait_for(daemon, run["id"], "delete", 1, timeout=300)
        daemon.terminate(signal.SIGKILL)
    finally:
        daemon.stop()
    assert reached["state"] == "running", reached
    assert scenario.in_use <= blobs_in(emulator, name)
    restart_finishes(config, state, run["id"], env)
    assert blobs_in(emulator, name) == scenario.in_use
    assert not planted & blobs_in(emulator, name)


@pytest.mark.parametrize("part", PARTS)
def test_a_wrong_key_or_a_missing_bucket_is_a_clear_error(
    part: str, emulators: dict[str, Emulator], shared: tuple[Registry, Scenario], tmp_path: Path
) -> None:
    registry, _scenario = shared
    emulator = emulators[part]
    name = seeded(emulator, registry, "config")
    env = cli_env(emulator)
    mistakes: list[tuple[Path, str]] = [
        (
            config_file(emulator, f"absent-{part}", tmp_path),
            f"'absent-{part}' does not exist at .* \\(check storage\\.{part}\\."
            + ("container" if part == "azure" else "bucket"),
        ),
        (
            config_file(emulator, name, tmp_path, rootdirectory="/elsewhere"),
            "no registry data.*check rootdirectory '/?elsewhere'",
        ),
    ]
    if part == "azure":
        wrong = base64.b64encode(b"not the account key of devstoreaccount1").decode()
        mistakes.append(
            (config_file(emulator, name, tmp_path, accountkey=wrong), "denied.*accountkey")
        )
    for config, error in mistakes:
        result = pruned("check", "--registry-config", config, "--grace", "0", env=env)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and re.search(error, last), last


def store_snapshot(store: Path) -> dict[str, str]:
    """Every registry key of a filesystem store and its content's sha256 (ours left out)."""
    v2 = store / layout.V2_ROOT
    return {
        str(p.relative_to(v2)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in v2.rglob("*")
        if p.is_file() and not str(p.relative_to(v2)).startswith(layout.OWN)
    }


@pytest.mark.parametrize("part", PARTS)
def test_delete_with_trash_then_restore_gives_the_same_store(
    part: str, emulators: dict[str, Emulator], shared: tuple[Registry, Scenario], tmp_path: Path
) -> None:
    registry, scenario = shared
    emulator = emulators[part]
    name = seeded(emulator, registry, "trash")
    emulator.copy_out(name, tmp_path / "before", ROOT)
    before = store_snapshot(tmp_path / "before")
    config = config_file(emulator, name, tmp_path, read_only=True)
    state = tmp_path / "state"
    args = ["--registry-config", config, "--grace", "0", "--state-dir", state]
    result = pruned(
        "delete", *args, "--trash", "7d", "--upload-max-age", "0", env=cli_env(emulator)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith(
        f"Moved {len(scenario.expected_orphans)} blobs ("
    )
    assert blobs_in(emulator, name) == scenario.in_use
    (run_id,) = [p.stem for p in (state / "runs").glob("*.json")]
    restored = pruned("restore", run_id, *args, env=cli_env(emulator))
    assert restored.returncode == 0, restored.stderr
    workdir = tmp_path / "restored"
    emulator.copy_out(name, workdir / "storage", ROOT)
    assert store_snapshot(workdir / "storage") == before
    # back onto a filesystem: the real registry serves every kept image whole
    with running_registry(workdir) as again:
        pull_kept(again.url, scenario.kept, tmp_path)
