"""Per-repository usage of a storage-source check, against the standard scenario's store."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.inventory import Inventory
from daemon.usage import UsagePairs, UsageTally, size_record
from tests.conftest import pruned
from tests.harness.daemon import Daemon
from tests.harness.fake_openshift import FakeOpenShift
from tests.harness.images import Scenario
from tests.harness.openshift_scenario import Pushed, cluster_for
from tests.harness.registry import Registry
from tests.harness.usage import expected_usage, file_size, tally


@pytest.fixture
def daemon(shared: tuple[Registry, Scenario], tmp_path: Path) -> Iterator[Daemon]:
    registry, _scenario = shared
    d = Daemon(registry.config_path, tmp_path / "state", "--grace", "0").start()
    yield d
    d.stop()


def test_check_reports_exclusive_and_shared_bytes_per_repository(
    daemon: Daemon, shared: tuple[Registry, Scenario]
) -> None:
    registry, scenario = shared
    status, run = daemon.json("POST", "/prune?mode=check&wait=true")
    assert status == 200 and run["state"] == "succeeded", run
    status, report = daemon.json("GET", f"/runs/{run['id']}/usage")
    assert status == 200
    expected = expected_usage(registry, scenario)
    rows = {r["repository"]: r for r in report["repositories"]}
    assert set(rows) == set(scenario.repositories)
    for repo, want in expected.items():
        got = {k: rows[repo][k] for k in want}
        assert got == want, repo
    tags = {"app": 3, "team/sub/app": 2, "other": 2 if scenario.schema1 else 1}
    assert {r: rows[r]["tags"] for r in tags} == tags
    # largest exclusive first, and the totals agree with the rows and the check's summary
    exclusive = [r["exclusive_bytes"] for r in report["repositories"]]
    assert exclusive == sorted(exclusive, reverse=True)
    totals = report["totals"]
    summary = run["summary"]
    assert totals["orphaned"] == {"blobs": summary["blobs"], "bytes": summary["bytes"]}
    assert (
        totals["in_use"]["bytes"]
        == sum(r["exclusive_bytes"] for r in rows.values()) + (totals["shared"]["bytes"])
    )
    assert totals["repositories"] == 3

    status, top = daemon.json("GET", f"/runs/{run['id']}/usage?top=1")
    assert status == 200 and top["repositories"] == report["repositories"][:1]
    status, _headers, body = daemon.get(
        f"/runs/{run['id']}/usage?top=2", headers={"Accept": "text/plain"}
    )
    text = body.decode()
    assert status == 200
    lines = text.splitlines()
    assert lines[0].split() == [
        "REPOSITORY",
        "TAGS",
        "MANIFESTS",
        "BLOBS",
        "SIZE",
        "EXCLUSIVE",
        "SHARED",
    ]
    assert lines[1].split()[0] == report["repositories"][0]["repository"]
    assert "(2 of 3 repositories shown)" in text
    assert any(line.startswith("Orphaned:") for line in lines)
    status, _h, body = daemon.get(f"/runs/{run['id']}/usage?top=x")
    assert status == 400 and b"top" in body


def test_too_young_blobs_and_unknown_runs(daemon: Daemon) -> None:
    status, body = daemon.json("GET", "/runs/nope/usage")
    assert status == 404 and "GET /runs" in body["error"]
    # asked without usage: the check is the same, with no report
    status, run = daemon.json("POST", "/prune?mode=check&wait=true&usage=false")
    assert status == 200 and run["state"] == "succeeded"
    status, body = daemon.json("GET", f"/runs/{run['id']}/usage")
    assert status == 404 and "no usage report" in body["error"]
    status, run = daemon.json("POST", "/prune?mode=check&wait=true&grace=1000h")
    status, report = daemon.json("GET", "/runs/latest/usage")
    assert status == 200
    # with a grace period longer than the store's age, every orphan is too young
    assert report["totals"]["orphaned"]["blobs"] == 0
    assert report["totals"]["too_young"]["blobs"] == run["summary"]["too_young"] > 0


def test_cli_check_usage_prints_the_table(shared: tuple[Registry, Scenario]) -> None:
    registry, scenario = shared
    result = pruned("check", "--registry-config", registry.config_path, "--grace", "0", "--usage")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Would delete ")
    header = next(i for i, line in enumerate(lines) if line.startswith("REPOSITORY"))
    expected = expected_usage(registry, scenario)
    first = max(expected, key=lambda r: expected[r]["exclusive_bytes"])
    assert lines[header + 1].split()[0] == first
    assert {line.split()[0] for line in lines[header + 1 : header + 4]} == set(expected)


def test_pairs_stay_compact_and_exact_across_flushes() -> None:
    """Many pairs through the flush/merge path: duplicates vanish, sharing is found."""
    inventory = Inventory()
    for name in ("a", "b", "c"):
        inventory.repo(name)
    pairs = UsagePairs(inventory)
    digests = [hashlib.sha256(b"%d" % i).digest() for i in range(20_000)]
    for _round in range(2):  # every pair twice: deduplicated
        for i, raw in enumerate(digests):
            pairs.add("a", raw)
            if i % 4 == 0:
                pairs.add_packed("b", raw)
    pairs.add_packed("c", b"".join(digests[:3]))
    tally = UsageTally(pairs, cutoff=0.0)
    by_shard: dict[int, bytearray] = {}
    for raw in digests:
        by_shard.setdefault(raw[0], bytearray()).extend(size_record(raw, 10))
    for shard in range(256):
        tally.account(shard, bytes(by_shard.get(shard, b"")))
    doc = tally.document((0, 0))
    rows = {r["repository"]: r for r in doc["repositories"]}
    assert rows["a"]["blobs"] == 20_000 and rows["b"]["blobs"] == 5_000
    # c's three: 0 (shared with a and b), 1 and 2 (shared with a)
    assert rows["a"]["shared_bytes"] == 5_002 * 10
    assert rows["a"]["exclusive_bytes"] == 14_998 * 10
    assert rows["b"]["exclusive_bytes"] == 0 and rows["c"]["shared_bytes"] == 30
    assert doc["totals"]["shared"] == {"blobs": 5_002, "bytes": 50_020}
    assert json.dumps(doc)  # plain JSON


async def test_openshift_source_reports_usage_per_image_stream(
    openshift_store: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, images = openshift_store
    refs: dict[str, set[str]] = {}
    for pushed in images.values():
        if pushed.repo not in ("ns2/gone", "a/b/c"):  # no image stream: removed, nothing kept
            refs.setdefault(pushed.repo, set()).update(pushed.digests())
    expected = tally(refs, file_size(registry))
    async with FakeOpenShift(cluster_for(images, skip=set())) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        daemon = Daemon(
            registry.config_path,
            tmp_path / "state",
            "--grace",
            "0",
            "--source",
            "openshift",
            "--kubeconfig",
            str(kubeconfig),
            env={"KUBECONFIG": ""},
        )
        await asyncio.to_thread(daemon.start)
        try:
            status, run = await asyncio.to_thread(
                daemon.json, "POST", "/prune?mode=check&wait=true"
            )
            assert status == 200 and run["state"] == "succeeded", run
            status, report = await asyncio.to_thread(daemon.json, "GET", f"/runs/{run['id']}/usage")
        finally:
            daemon.stop()
    assert status == 200
    rows = {r["repository"]: r for r in report["repositories"]}
    for repo, want in expected.items():
        assert {k: rows[repo][k] for k in want} == want, repo
    assert rows["ns2/gone"]["bytes"] == rows["a/b/c"]["bytes"] == 0
    assert expected["ns1/app"]["shared_bytes"] > 0  # the base layer, in three streams
    assert report["repositories"][0]["repository"] == "ns1/app"
