"""The HTTP run API through a real listening daemon process."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import pruned, synthetic_store
from tests.harness.daemon import Daemon
from tests.harness.images import Scenario
from tests.harness.registry import Registry

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic 50,000-blob store written in distribution's layout: a run takes seconds."""
    return synthetic_store(tmp_path_factory.mktemp("big"), 50_000, 200, 3)


@pytest.fixture
def daemon(shared: tuple[Registry, Scenario], tmp_path: Path) -> Iterator[Daemon]:
    registry, _scenario = shared
    d = Daemon(registry.config_path, tmp_path / "state", "--grace", "0").start()
    yield d
    d.stop()


@pytest.fixture
def big_daemon(big_store: Path, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(big_store, tmp_path / "state").start()
    yield d
    d.stop()


def test_check_run_polls_to_the_cli_answer(
    daemon: Daemon, shared: tuple[Registry, Scenario]
) -> None:
    registry, scenario = shared
    status, headers, body = daemon.request("POST", "/prune?mode=check")
    assert status == 202
    doc = json.loads(body)
    assert headers["Location"] == f"/runs/{doc['id']}"
    for field in (
        "id",
        "mode",
        "source",
        "state",
        "phase",
        "started_at",
        "finished_at",
        "progress",
        "summary",
        "error",
    ):
        assert field in doc
    assert (doc["mode"], doc["source"]) == ("check", "storage")
    final = daemon.wait_done(doc["id"])
    assert final["state"] == "succeeded" and final["error"] is None
    assert final["finished_at"] and final["phase"] == "done"
    summary = final["summary"]
    assert summary["blobs"] == len(scenario.expected_orphans)
    for key in ("blobs", "bytes", "repositories", "manifest_links", "too_young"):
        assert key in summary
    progress = final["progress"]
    assert progress["repositories"] == len(scenario.repositories)
    assert progress["blobs_scanned"] == len(scenario.pushed)
    cli = pruned("check", "--registry-config", registry.config_path, "--grace", "0")
    assert cli.stdout.splitlines()[0] == f"Would delete {summary['blobs']} blobs"
    # the candidates, streamed as NDJSON, are the CLI's candidates
    status, headers, body = daemon.get(f"/runs/{doc['id']}/candidates")
    assert status == 200 and headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert {line["digest"] for line in lines} == scenario.expected_orphans
    assert all(set(line) == {"digest", "size", "path"} for line in lines)
    assert all(Path(line["path"]).is_file() for line in lines)
    # text/plain answers in the original pruner's words, exactly
    status, _h, body = daemon.get("/runs/latest", headers={"Accept": "text/plain"})
    assert status == 200
    assert body.decode() == "\n".join(cli.stdout.splitlines()) + "\n"


def test_curl_one_liner_as_written(daemon: Daemon) -> None:
    out = subprocess.run(
        ["curl", "-s", f"localhost:{daemon.port}/prune?mode=check"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    doc = json.loads(out.stdout)
    assert doc["mode"] == "check" and doc["state"] in ("running", "succeeded")
    assert daemon.wait_done(doc["id"])["state"] == "succeeded"


def test_wait_true_and_delete_needs_post(daemon: Daemon) -> None:
    status, _h, body = daemon.request("GET", "/prune?mode=check&wait=true")
    assert status == 200 and json.loads(body)["state"] == "succeeded"
    status, _h, body = daemon.request("GET", "/prune?mode=delete")
    assert status == 405
    assert json.loads(body)["error"] == (
        f"deleting needs POST: curl -X POST '127.0.0.1:{daemon.port}/prune?mode=delete'"
    )
    before = daemon.json("GET", "/runs")[1]
    # the registry is writable: delete is refused at once, says how to proceed, and is no run
    status, _h, body = daemon.request("POST", "/prune?mode=delete&wait=true")
    doc = json.loads(body)
    assert status == 409 and doc["error"] == "the registry is not in read-only mode"
    assert "storage.maintenance.readonly.enabled" in doc["hint"]
    # online mode cannot be made safe with the storage source: refused the same way
    status, _h, body = daemon.request("POST", "/prune?mode=delete&online=true")
    doc = json.loads(body)
    assert status == 409 and "not offered for the storage source" in doc["error"]
    assert "read-only" in doc["hint"]
    assert daemon.json("GET", "/runs")[1] == before


@pytest.mark.parametrize(
    ("method", "path", "status", "line"),
    [
        ("GET", "/prune?mode=delete", 405, "deleting needs POST: curl -X POST '127.0.0.1:{port}"),
        (
            "POST",
            "/prune?mode=zap",
            400,
            "mode must be check or delete (or verify, recover), not 'zap'",
        ),
        ("GET", "/runs/nope", 404, "no run 'nope'; see GET /runs"),
        ("GET", "/nowhere", 404, "no such path; see the API in the README"),
        ("POST", "/prune?mode=delete", 409, "the registry is not in read-only mode; set it"),
    ],
)
def test_errors_follow_accept(
    daemon: Daemon, method: str, path: str, status: int, line: str
) -> None:
    """curl -H 'Accept: text/plain' gets one line of text; anything else gets JSON."""
    expected = line.format(port=daemon.port)
    got, headers, body = daemon.request(method, path, headers={"Accept": "text/plain"})
    text = body.decode()
    assert got == status and headers["Content-Type"].startswith("text/plain")
    assert text.startswith(expected) and text.endswith("\n") and text.count("\n") == 1
    got, headers, body = daemon.request(method, path, headers={"Accept": "*/*"})  # curl's
    assert got == status and json.loads(body)["error"].startswith(expected.split("; ")[0])
    assert daemon.json("GET", "/runs")[1] == []


def test_one_shot_runs_share_the_history(shared: tuple[Registry, Scenario], tmp_path: Path) -> None:
    """A one-shot CLI run records itself where the daemon keeps its history, and shows up."""
    registry, _scenario = shared
    state = tmp_path / "state"
    daemon = Daemon(registry.config_path, state, "--grace", "0").start()
    try:
        out = pruned(
            "check",
            "--registry-config",
            registry.config_path,
            "--grace",
            "0",
            "--state-dir",
            state,
            "--log-level",
            "info",
        )
        assert out.returncode == 0, out.stderr
        logged = {json.loads(line)["run_id"] for line in out.stderr.splitlines()}
        deadline = time.monotonic() + 10
        runs: list[dict[str, object]] = []
        # the daemon may have seen it running: wait for it to see the end too
        while time.monotonic() < deadline and [r["state"] for r in runs] != ["succeeded"]:
            runs = daemon.json("GET", "/runs")[1]
            time.sleep(0.1)
        assert [(r["id"], r["mode"], r["state"]) for r in runs] == [(*logged, "check", "succeeded")]
        body = daemon.get(f"/runs/{runs[0]['id']}/candidates")[2].decode()
        assert {json.loads(line)["digest"] for line in body.splitlines()} == set(
            DIGEST.findall(out.stderr)
        )
        # a refused one-shot delete records nothing
        refused = pruned("delete", "--registry-config", registry.config_path, "--state-dir", state)
        assert refused.returncode == 2
        assert refused.stderr.startswith("error: the registry is not in read-only mode\nhint: ")
        assert sorted(p.name for p in (state / "runs").glob("*.json")) == [f"{runs[0]['id']}.json"]
    finally:
        daemon.stop()


def test_a_live_one_shot_run_is_not_marked_interrupted(
    shared: tuple[Registry, Scenario], tmp_path: Path
) -> None:
    """A daemon starting next to a running one-shot run leaves it alone while its process
    holds the run's lock, and marks it interrupted once the process is gone."""
    registry, _scenario = shared
    runs = tmp_path / "state" / "runs"
    runs.mkdir(parents=True)
    run_id = "20261130T000000.000000-abcdef"
    (runs / f"{run_id}.json").write_text(
        json.dumps({"id": run_id, "mode": "check", "source": "storage", "state": "running"})
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(runs / f"{run_id}.lock")],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
    daemon = Daemon(registry.config_path, tmp_path / "state").start()
    try:
        assert daemon.json("GET", f"/runs/{run_id}")[1]["state"] == "running"
        holder.kill()
        holder.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if daemon.json("GET", f"/runs/{run_id}")[1]["state"] != "running":
                break
            time.sleep(0.1)
        assert daemon.json("GET", f"/runs/{run_id}")[1]["state"] == "interrupted"
        assert json.loads((runs / f"{run_id}.json").read_text())["state"] == "interrupted"
    finally:
        daemon.stop()
        holder.kill()


HOLD_LOCK = (
    "import fcntl, sys, time; fh = open(sys.argv[1], 'ab'); fcntl.flock(fh, fcntl.LOCK_EX); "
    "print('locked', flush=True); time.sleep(120)"
)


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("mode=zap", "mode must be check or delete"),
        ("", "mode must be check or delete"),
        ("mode=check&grace=soon", "grace"),
        ("mode=check&grace=-1h", "grace"),
        ("mode=check&source=etcd", "source must be one of"),
        ("mode=check&colour=red", "unknown parameter colour"),
        ("mode=check&online=perhaps", "online must be true or false"),
        ("mode=check&mode=delete", "given once"),
        ("mode=" + "x" * 5000, "short"),
    ],
)
def test_bad_input_is_400_with_what_is_accepted(daemon: Daemon, query: str, words: str) -> None:
    status, headers, body = daemon.request("POST", f"/prune?{query}")
    assert status == 400, body
    assert headers["Content-Type"].startswith("application/json")
    assert words in json.loads(body)["error"]


def test_unknown_things_are_404(daemon: Daemon) -> None:
    assert daemon.get("/runs/nope")[0] == 404
    assert daemon.request("POST", "/runs/nope/stop")[0] == 404
    assert daemon.get("/runs/nope/candidates")[0] == 404
    status, _h, body = daemon.get("/nowhere")
    assert status == 404 and "error" in json.loads(body)


def test_health_ready_metrics(daemon: Daemon) -> None:
    assert daemon.json("GET", "/healthz") == (200, {"status": "ok"})
    status, doc = daemon.json("GET", "/readyz")
    assert status == 200 and doc["status"] == "ready"
    daemon.request("GET", "/prune?mode=check&wait=true")
    status, headers, body = daemon.get("/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'registry_pruned_runs_total{mode="check",result="succeeded"} 1.0' in text
    assert "registry_pruned_run_duration_seconds_count" in text
    assert "registry_pruned_run_active 0.0" in text


def test_conflict_progress_and_stop_mid_run(big_daemon: Daemon) -> None:
    status, first = big_daemon.json("POST", "/prune?mode=check")
    assert status == 202
    status, conflict = big_daemon.json("POST", "/prune?mode=check")
    assert status == 409 and conflict["active"] == first["id"] and "error" in conflict
    # progress moves while it runs
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        doc = big_daemon.json("GET", f"/runs/{first['id']}")[1]
        seen.append(doc["progress"]["repositories"] + doc["progress"]["manifests"])
        if doc["progress"]["manifests"] > 0:
            break
        time.sleep(0.02)
    assert doc["state"] == "running" and max(seen) > 0
    status, _h, body = big_daemon.get("/metrics")
    assert "registry_pruned_run_active 1.0" in body.decode()
    asked = time.monotonic()
    status, _doc = big_daemon.json("POST", f"/runs/{first['id']}/stop")
    assert status == 202
    final = big_daemon.wait_done(first["id"], timeout=5)
    assert time.monotonic() - asked < 1.0
    assert final["state"] == "stopped"
    assert final["progress"]["shards_done"] < 256  # partial counts
    assert big_daemon.json("POST", f"/runs/{first['id']}/stop")[0] == 409
    # its text says it is partial, never a complete check's last line
    text = big_daemon.get(f"/runs/{first['id']}", headers={"Accept": "text/plain"})[2].decode()
    assert "Use mode=delete" not in text
    if final["phase"] in ("guard", "scan-repositories", "mark"):
        assert text == f"Run {first['id']} stopped during {final['phase']}: nothing was decided\n"
    else:
        assert f"Run {first['id']} stopped during {final['phase']}: counts are partial" in text
    ended = [
        json.loads(line)
        for line in big_daemon.log.read_text().splitlines()
        if '"run ended"' in line and first["id"] in line
    ]
    assert [line["level"] for line in ended] == ["warning"]


def test_history_survives_restart_and_kill_marks_interrupted(
    big_store: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    daemon = Daemon(big_store, state).start()
    try:
        status, done = daemon.json("GET", "/prune?mode=check&wait=true")
        assert done["state"] == "succeeded"
        status, running = daemon.json("POST", "/prune?mode=check")
        assert status == 202
        time.sleep(0.3)
        daemon.terminate(signal.SIGKILL)
    finally:
        daemon.stop()
    again = Daemon(big_store, state).start()
    try:
        status, runs = again.json("GET", "/runs")
        assert [r["id"] for r in runs] == [running["id"], done["id"]]  # newest first
        assert runs[0]["state"] == "interrupted" and runs[0]["error"]
        assert runs[1]["state"] == "succeeded"
        assert runs[1]["summary"] == done["summary"]
        lines = again.get(f"/runs/{done['id']}/candidates")[2].decode().splitlines()
        assert len(lines) == done["summary"]["blobs"]
        # ~5,000 candidates: written 2,048 at a time during the sweep, each line once
        assert len({json.loads(line)["digest"] for line in lines}) == len(lines) > 2048
        # and a new run works after the restart
        assert again.json("GET", "/prune?mode=check&wait=true")[1]["state"] == "succeeded"
    finally:
        again.stop()


def test_sigterm_stops_and_records_the_active_run(big_store: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    daemon = Daemon(big_store, state).start()
    try:
        _status, run = daemon.json("POST", "/prune?mode=check")
        time.sleep(0.3)
        assert daemon.terminate(signal.SIGTERM) == 0
    finally:
        daemon.stop()
    doc = json.loads((state / "runs" / f"{run['id']}.json").read_text())
    assert doc["state"] == "stopped" and doc["finished_at"]


def test_history_is_bounded(shared: tuple[Registry, Scenario], tmp_path: Path) -> None:
    registry, _scenario = shared
    daemon = Daemon(registry.config_path, tmp_path / "state", "--history", "2").start()
    try:
        ids = [daemon.json("GET", "/prune?mode=check&wait=true")[1]["id"] for _ in range(4)]
        _status, runs = daemon.json("GET", "/runs")
        assert [r["id"] for r in runs] == ids[::-1][:2]
        files = sorted(p.name for p in (tmp_path / "state" / "runs").iterdir())
        assert len([f for f in files if f.endswith(".json")]) == 2
    finally:
        daemon.stop()
