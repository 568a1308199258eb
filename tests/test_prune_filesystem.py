"""Hard-prune a filesystem store written by the real docker-registry, through the real CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon.inventory import Inventory
from daemon.storage.filesystem import FilesystemStorage
from tests.conftest import check_logged, pruned, would_delete
from tests.harness.images import RegistryClient, Scenario, pull_kept
from tests.harness.registry import Registry, RegistryError, blobs_on_disk

#: the system's own directories: what PATH holds on a machine where nothing else was installed
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def test_check_matches_garbage_collect_digest_for_digest(
    shared: tuple[Registry, Scenario],
) -> None:
    registry, scenario = shared
    before = blobs_on_disk(registry)
    result = check_logged(registry.config_path)
    assert result.returncode == 0, result.stderr
    ours = would_delete(result.stderr)
    peer = registry.garbage_collect(dry_run=True)
    assert peer == scenario.expected_orphans
    assert ours == peer
    lines = result.stdout.splitlines()
    assert lines[0] == f"Would delete {len(peer)} blobs"
    assert re.fullmatch(r"Would free up [0-9.]+ (B|KiB|MiB) of disk space", lines[1])
    assert lines[-1] == "Use mode=delete to actually delete the data"
    assert "stale upload" not in result.stdout  # the upload is minutes old: kept, and said so
    assert "Kept 1 upload younger than the upload age limit (--upload-max-age 24h)" in (
        result.stdout
    )
    assert blobs_on_disk(registry) == before  # check never changes anything


def test_check_scan_names_layer_directories_instead_of_listing_them(
    shared: tuple[Registry, Scenario],
) -> None:
    registry, _scenario = shared

    async def scan(layers: bool) -> tuple[list[str], Inventory]:
        storage = FilesystemStorage(str(registry.root), 2)
        inventory = Inventory(keep_layers=layers)
        keys = [k async for batch in storage.scan_repositories(layers=layers) for k in batch]
        inventory.add_keys(keys)
        await storage.close()
        return keys, inventory

    full, everything = asyncio.run(scan(True))
    short, check = asyncio.run(scan(False))
    layer_links = [k for k in full if "/_layers/sha256/" in k]
    assert layer_links and not [k for k in short if "/_layers/sha256/" in k]
    markers = {k.split("/_layers/")[0] + "/_layers/" for k in layer_links}
    assert sorted(short) == sorted([k for k in full if k not in layer_links] + list(markers))
    assert everything.repositories.keys() == check.repositories.keys()
    for name, repo in everything.repositories.items():
        assert (repo.revisions, repo.tags) == (
            check.repositories[name].revisions,
            check.repositories[name].tags,
        )
    assert everything.unknown == check.unknown == 0


def test_grace_period_keeps_young_blobs(shared: tuple[Registry, Scenario]) -> None:
    registry, _scenario = shared
    result = pruned("check", "--registry-config", registry.config_path)  # default 1h
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "Would delete 0 blobs"
    assert "blobs younger than the 1h grace period" in result.stdout


def test_delete_refused_while_registry_writable(fresh: tuple[Registry, Scenario]) -> None:
    registry, _scenario = fresh
    before = blobs_on_disk(registry)
    result = pruned("delete", "--registry-config", registry.config_path, "--grace", "0")
    assert result.returncode == 2
    assert "read-only" in result.stderr and "storage.maintenance.readonly" in result.stderr
    assert blobs_on_disk(registry) == before


def test_delete_in_read_only_mode_then_everything_kept_pulls(
    fresh: tuple[Registry, Scenario], tmp_path: Path
) -> None:
    registry, scenario = fresh
    registry.restart(read_only=True)
    result = pruned(
        "delete",
        "--registry-config",
        registry.config_path,
        "--grace",
        "0",
        "--upload-max-age",
        "0",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"Deleted {len(scenario.expected_orphans)} blobs"
    assert lines[1].startswith("Freed up ")
    assert "Deleted 1 stale upload\n" in result.stdout
    on_disk = blobs_on_disk(registry)
    assert on_disk == scenario.pushed - scenario.expected_orphans
    v2 = registry.root / "docker/registry/v2/repositories"
    for repo, uuid in scenario.uploads:
        assert not (v2 / repo / "_uploads" / uuid).exists()
    # no layer link is left pointing at a deleted blob
    for link in v2.glob("**/_layers/sha256/*/link"):
        assert link.read_text() in on_disk
    # nothing of ours is left in the store, and distribution's own collector, for real,
    # finds nothing to do and nothing it cannot read
    assert not (registry.root / "docker/registry/v2/_registry-pruned").exists()
    assert registry.garbage_collect(dry_run=True) == set()
    assert registry.garbage_collect(dry_run=False) == set()
    assert blobs_on_disk(registry) == on_disk
    registry.restart(read_only=False)
    pull_kept(registry.url, scenario.kept, tmp_path)
    # a second run has nothing left to do
    again = pruned("check", "--registry-config", registry.config_path, "--grace", "0")
    assert again.stdout.splitlines()[0] == "Would delete 0 blobs"


def test_online_delete_is_refused_for_the_storage_source(
    fresh: tuple[Registry, Scenario],
) -> None:
    registry, _scenario = fresh
    before = blobs_on_disk(registry)
    result = pruned("delete", "--registry-config", registry.config_path, "--online", "--grace", "0")
    assert result.returncode == 2
    assert "online delete is not offered for the storage source" in result.stderr
    assert "read-only" in result.stderr
    assert blobs_on_disk(registry) == before


def _revision(registry: Registry, scenario: Scenario, repo: str = "app") -> Path:
    image = next(i for i in scenario.images if i.repository == repo and not i.deleted and i.tag)
    hexd = image.digest.split(":")[1]
    return (
        registry.root / f"docker/registry/v2/repositories/{repo}/_manifests/revisions/sha256/{hexd}"
    )


def _blob(registry: Registry, digest: str) -> Path:
    hexd = digest.split(":")[1]
    return registry.root / f"docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data"


def _fails_closed(registry: Registry, expect: str) -> None:
    before = blobs_on_disk(registry)
    registry.restart(read_only=True)
    result = pruned("delete", "--registry-config", registry.config_path, "--grace", "0")
    assert result.returncode == 1, result.stdout + result.stderr
    assert expect in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # a one-line cause
    assert blobs_on_disk(registry) == before
    # distribution's collector refuses the same store too
    with pytest.raises(RegistryError, match="failed to mark"):
        registry.garbage_collect(dry_run=True)


def test_corrupt_manifest_fails_closed(fresh: tuple[Registry, Scenario]) -> None:
    registry, scenario = fresh
    link = _revision(registry, scenario) / "link"
    _blob(registry, link.read_text()).write_bytes(b'{"schemaVersion": 2, "mediaType": ')
    _fails_closed(registry, "cannot be parsed")


def test_garbage_link_fails_closed(fresh: tuple[Registry, Scenario]) -> None:
    registry, scenario = fresh
    (_revision(registry, scenario) / "link").write_text("sha256:not-a-digest")
    _fails_closed(registry, "is corrupt")


def test_missing_blob_behind_revision_is_skipped_like_distribution(
    fresh: tuple[Registry, Scenario],
) -> None:
    registry, scenario = fresh
    link = _revision(registry, scenario) / "link"
    shutil.rmtree(_blob(registry, link.read_text()).parent)
    result = check_logged(registry.config_path)
    assert result.returncode == 0, result.stderr
    assert "has no blob" in result.stderr
    assert would_delete(result.stderr) == registry.garbage_collect(dry_run=True)


def test_wrong_root_and_bad_config_are_clear_errors(tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text(
        yaml.safe_dump({"storage": {"filesystem": {"rootdirectory": str(tmp_path / "nope")}}})
    )
    result = pruned("check", "--registry-config", config)
    assert result.returncode == 1 and "does not exist" in result.stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    config.write_text(
        yaml.safe_dump({"storage": {"filesystem": {"rootdirectory": str(tmp_path / "junk")}}})
    )
    result = pruned("check", "--registry-config", config)
    assert result.returncode == 1 and "is not a registry store" in result.stderr
    config.write_text("storage: {filesystem: [")
    result = pruned("check", "--registry-config", config)
    assert result.returncode == 2 and str(config) in result.stderr
    result = pruned("check", "--registry-config", tmp_path / "missing.yml")
    assert result.returncode == 2 and "missing.yml does not exist" in result.stderr
    assert "--registry-config FILE" in result.stderr  # and what to do instead


def test_json_logs_carry_the_run_id(shared: tuple[Registry, Scenario]) -> None:
    registry, _scenario = shared
    result = pruned(
        "check", "--registry-config", registry.config_path, "--grace", "0", "--log-level", "info"
    )
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    ids = {line["run_id"] for line in lines}
    assert len(ids) == 1 and any(line["event"].startswith("Would delete blob: ") for line in lines)


def test_python_m_and_console_script_agree(shared: tuple[Registry, Scenario]) -> None:
    registry, _scenario = shared
    # next to the interpreter, never through PATH: the README's commands do not activate the
    # venv, and a registry-pruned left on PATH by another install would be tested instead
    script = Path(sys.executable).with_name("registry-pruned")
    assert script.exists(), f"{script}: the console script is not installed (pip install -e .)"
    out = subprocess.run(
        [script, "check", "--registry-config", str(registry.config_path), "--grace", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PATH": SYSTEM_PATH},
    )
    assert (
        out.stdout
        == pruned("check", "--registry-config", registry.config_path, "--grace", "0").stdout
    )
    client = RegistryClient(registry.url)
    assert client.catalog()  # the registry still serves


def test_reader_processes_do_not_import_the_cli_again() -> None:
    """A spawned reader runs the script that started the daemon again, as ``__mp_main__``:
    the console script must not pull in the CLI (it cost each reader ~10 MB and 0.2 s)."""
    script = Path(sys.executable).with_name("registry-pruned")
    assert script.exists(), f"{script}: the console script is not installed (pip install -e .)"
    # what multiprocessing.spawn does with the parent's __main__ when it is a script
    probe = (
        "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__mp_main__'); "
        "print(sorted(m for m in ('daemon.cli', 'daemon.prune', 'aiohttp') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(script)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_a_closed_pipe_ends_the_cli_quietly(shared: tuple[Registry, Scenario]) -> None:
    """`registry-pruned check | head -2`: the reader left, no traceback follows."""
    registry, _scenario = shared
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "check", "--registry-config", registry.config_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
