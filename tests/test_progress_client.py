"""Progress fraction and ETA, and the ``registry-pruned run|status|history|stop`` client."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.progress import Progress
from tests.conftest import pruned, synthetic_store
from tests.harness.daemon import ROOT, Daemon


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic 30,000-blob store: a check lasts long enough to be watched."""
    return synthetic_store(tmp_path_factory.mktemp("synth"), 30_000, 120, 5)


@pytest.fixture(scope="module")
def daemon(synth_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(synth_store, tmp_path_factory.mktemp("state") / "state", "--grace", "0").start()
    yield d
    d.stop()


def client(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return pruned(*args, "--url", daemon.url)


def test_fraction_grows_over_the_phases() -> None:
    progress = Progress()
    seen = [progress.fraction(False)]
    progress.enter("scan-repositories")
    progress.repositories_expected = 10
    for n in range(0, 12, 3):
        progress.repositories = n
        seen.append(progress.fraction(False))
    progress.enter("mark")
    progress.manifests_total = 100
    for n in (0, 50, 100):
        progress.manifests = n
        seen.append(progress.fraction(False))
    progress.enter("sweep")
    for n in (0, 128, 256):
        progress.shards_done = n
        seen.append(progress.fraction(False))
    progress.enter("report")
    seen.append(progress.fraction(False))
    assert seen == sorted(seen) and seen[0] == 0.0 and seen[-1] == 1.0
    assert 0.55 in seen and 0.775 in seen  # mark done; half the sweep
    assert progress.eta(10.0, False) == 0.0
    # half way through the mark, 4 s into it: 4 s more of mark, and the sweep weighs as much
    progress.enter("mark")
    progress.phase_started -= 4.0
    progress.manifests = 50
    assert progress.eta(10.0, False) == pytest.approx(4 + 8 * 0.45 / 0.45, abs=0.1)
    # before a phase's own pace is known: the whole run's pace (10 s for 10% leaves 90 s)
    progress.enter("scan-repositories")
    progress.repositories = 5
    assert progress.fraction(False) == 0.05
    assert progress.eta(10.0, False) == pytest.approx(190.0, abs=0.1)
    progress.repositories_expected = 0
    assert progress.eta(10.0, False) is None


def test_a_delete_runs_fraction_and_eta_count_the_verify_after_it() -> None:
    progress = Progress()
    seen: list[float] = []
    progress.enter("scan-repositories")
    progress.repositories_expected = progress.repositories = 10
    seen.append(progress.fraction(True))
    progress.enter("mark")
    progress.manifests_total = progress.manifests = 100
    seen.append(progress.fraction(True))
    progress.enter("sweep")
    progress.shards_done = 256
    seen.append(progress.fraction(True))
    progress.enter("delete")
    progress.candidates, progress.deleted = 100, 50
    seen.append(progress.fraction(True))
    # the delete phase's own pace says nothing of the verify: the whole run's pace
    assert progress.eta(24.0, True) == pytest.approx(24.0, abs=0.1)  # half of 0.3 after 0.35
    progress.deleted = 100
    progress.enter("verify")
    seen.append(progress.fraction(True))
    assert seen == sorted(seen) and seen[-1] == 0.65  # not back to 0 while verifying
    # 30 s before the verify weighed 0.65, so the verify (0.35) takes 16.2 s; 5 s are spent
    progress.phase_started -= 5.0
    assert progress.eta(35.0, True) == pytest.approx(30 / 0.65 * 0.35 - 5, abs=0.1)
    progress.phase_started -= 60.0  # slower than foreseen: about to end, never "over"
    assert progress.eta(95.0, True) == 1.0
    progress.enter("done")
    assert progress.fraction(True) == 1.0 and progress.eta(95.0, True) == 0.0


def test_fraction_and_eta_while_a_check_runs(daemon: Daemon) -> None:
    status, run = daemon.json("POST", "/prune?mode=check")
    assert status == 202
    samples = []
    metrics_seen = False
    while True:
        doc = daemon.json("GET", f"/runs/{run['id']}")[1]
        if doc["state"] != "running":
            break
        samples.append((doc["progress"]["fraction"], doc["progress"]["eta_seconds"]))
        if not metrics_seen and 0 < doc["progress"]["fraction"] < 1:
            text = daemon.get("/metrics")[2].decode()
            value = re.search(r"^registry_pruned_run_fraction ([0-9.e-]+)$", text, re.M)
            metrics_seen = value is not None and 0 < float(value.group(1)) <= 1
        time.sleep(0.02)
    assert doc["state"] == "succeeded"
    assert doc["progress"]["fraction"] == 1.0 and doc["progress"]["eta_seconds"] == 0.0
    fractions = [f for f, _eta in samples]
    assert fractions == sorted(fractions) and all(0 <= f <= 1 for f in fractions)
    assert any(0 < f < 1 and eta is not None and eta > 0 for f, eta in samples), samples
    assert metrics_seen
    text = daemon.get("/metrics")[2].decode()
    assert "registry_pruned_run_fraction" in text and "registry_pruned_run_eta_seconds" in text


def test_run_in_a_pipe_prints_plain_progress_then_the_summary(daemon: Daemon) -> None:
    result = client(daemon, "run", "check", "--interval", "0.1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Would delete ") and lines[0].endswith(" blobs")
    assert lines[-1] == "Use mode=delete to actually delete the data"
    progress = [line for line in result.stderr.splitlines() if "%" in line]
    assert progress and all("eta" in line for line in progress)
    assert re.search(r"^done +100\.0% .* eta 0s$", progress[-1]), progress[-1]
    assert "\x1b[" not in result.stderr  # no terminal codes in a pipe

    history = client(daemon, "history")
    assert history.returncode == 0
    assert history.stdout.splitlines()[0].split()[:3] == ["ID", "MODE", "STATE"]
    assert re.search(r" check +succeeded ", history.stdout)
    status = client(daemon, "status")
    assert status.returncode == 0 and "succeeded" in status.stdout
    assert "Would delete" in status.stdout


def on_a_terminal(*args: str) -> tuple[int, str, str]:
    """``python -m daemon ARGS`` with stderr on a pseudo-terminal: (exit, stdout, terminal)."""
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=child,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(child)
    seen = b""
    while True:
        ready, _w, _x = select.select([main], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child side closed
            break
        if not chunk:
            break
        seen += chunk
    out, _err = proc.communicate(timeout=60)
    os.close(main)
    return proc.returncode, out.decode(), seen.decode(errors="replace")


def test_run_on_a_terminal_draws_a_bar(daemon: Daemon) -> None:
    code, out, terminal = on_a_terminal("run", "check", "--url", daemon.url)
    assert code == 0, terminal
    assert "━" in terminal and "100%" in terminal  # rich's bar, finished
    assert out.startswith("Would delete ")


def test_one_shot_check_draws_the_bar_on_a_terminal(synth_store: Path) -> None:
    code, out, terminal = on_a_terminal(
        "check", "--registry-config", str(synth_store), "--grace", "0"
    )
    assert code == 0, terminal
    assert "━" in terminal and "100%" in terminal
    assert out.startswith("Would delete 3000 blobs")


def test_stop_and_a_refused_run(daemon: Daemon) -> None:
    idle = client(daemon, "stop")
    assert idle.returncode == 1 and "no run is running" in idle.stderr
    status, run = daemon.json("POST", "/prune?mode=check")
    assert status == 202
    stopped = client(daemon, "stop")
    final = daemon.wait_done(run["id"])["state"]
    if final == "stopped":
        assert stopped.returncode == 0 and run["id"] in stopped.stdout
    else:  # the small store's check ended before the client process had started
        assert final == "succeeded", final
        said = stopped.stderr + stopped.stdout
        assert stopped.returncode == 1 and ("no run is running" in said or "not running" in said)
    # delete is refused by the read-only guard: the run fails, the client exits 1
    refused = client(daemon, "run", "delete")
    assert refused.returncode == 1
    assert "read-only" in refused.stderr
    unreachable = pruned("status", "--url", "http://127.0.0.1:9")
    assert unreachable.returncode == 1 and "cannot reach the daemon" in unreachable.stderr
