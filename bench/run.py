"""Filesystem benchmarks against distribution's collector, in one run on the same stores.

    python bench/run.py all [--work DIR] [--repeat 3]        everything below, N times, medians
    python bench/run.py check [--blobs 50000 --blobs 500000]  check time: CLI, API, peer, floor
    python bench/run.py rss [--blobs 100000 --blobs 1000000]  peak RSS of a check, bytes a blob
        [--no-peer] [--mode delete [--in-place]]              ours only; a delete's peak RSS
    python bench/run.py store [--blobs 1000000]               only make the stores (not timed)
    python bench/run.py delete [--blobs 50000]                orphans deleted a second
    python bench/run.py status [--blobs 500000]               GET /runs/latest p50/p99 in a run
    python bench/run.py verify [--blobs 50000]                verify time next to a check's
    python bench/run.py untagged [--blobs 50000]              untagged check vs --delete-untagged
    python bench/run.py s3 [--blobs 50000] [ARGS...]          bench/s3_check.py (SeaweedFS)

Stores are made by bench/synth.py under ``--work`` (default /tmp/pruned-bench) and kept
there for the next run (a ``bench.json`` beside each says what it holds). Every figure is a
JSON line on stdout; timed commands are run once to warm the page cache, then ``--times``
times (default 3), and the median is kept. The peer is ``docker-registry garbage-collect``
(Debian's distribution 2.8) on the same store; the floor is ``find <blobs> -name data | wc -l``.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synth import generate, plan_for  # noqa: E402
from tests.harness.daemon import Daemon  # noqa: E402

ELIGIBLE = re.compile(rb"^blob eligible for deletion: (sha256:[0-9a-f]{64})", re.MULTILINE)
WOULD = re.compile(r"^(?:Would delete|Deleted) (\d+) blobs$", re.MULTILINE)
PEER_CHECK = ["docker-registry", "garbage-collect", "--dry-run"]
GOAL_CHECK_RATIO = 3.0
GOAL_BYTES_PER_BLOB = 200
GOAL_P99_MS = 100.0
GOAL_VERIFY_RATIO = 1.5  # verify at most 1.5x a check (issue 24)


def installed_bytecode() -> None:
    """Compile the package's bytecode, as ``pip install`` does (the Containerfile's image has
    it): from this checkout, under PYTHONDONTWRITEBYTECODE=1 (set on this machine), every CLI
    run and every reader process compiled the daemon's modules from source again (~0.1 s of
    CPU each in 2026-11 figures), which an installed registry-pruned never does."""
    compileall.compile_dir(str(ROOT / "daemon"), quiet=1)


def emit(**fields: Any) -> dict[str, Any]:
    fields.setdefault("load", [round(x, 2) for x in os.getloadavg()])
    print(json.dumps(fields), flush=True)
    return fields


@dataclass(frozen=True)
class Child:
    seconds: float
    max_rss_kb: int
    returncode: int
    stdout: bytes
    #: user + system seconds, its waited-for children (reader processes) included
    cpu_seconds: float = 0.0


def run_child(cmd: Sequence[str], env: dict[str, str] | None = None) -> Child:
    """Run ``cmd``: wall time, and its peak RSS with its children's added (reader processes).

    The peak is the larger of ``/usr/bin/time -f %M`` (one process's high-water mark) and the
    sum over the process tree sampled every 20 ms. Not wait4's rusage: Linux carries the
    forking parent's high-water mark over fork and exec, so a child of this (large) process
    would report at least this process's RSS.
    """
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r") as rss:
        started = time.perf_counter()
        proc = subprocess.Popen(
            ["/usr/bin/time", "-o", rss.name, "-f", "%M %U %S", *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
        )
        tree_peak = 0
        while proc.poll() is None:
            # below /usr/bin/time: the command and what it started
            tree_peak = max(tree_peak, sum(map(rss_kb, descendants(proc.pid))))
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        out.seek(0)
        data = out.read()
        lines = rss.read().split()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}: {data[-2000:].decode()}")
    peak, user, system = lines[-3:]
    cpu = float(user) + float(system)
    return Child(seconds, max(int(peak), tree_peak), proc.returncode, data, cpu)


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` with its reaped children and its live descendants (a serving
    daemon's reader processes): read before and after a run, the run's CPU, whatever the
    load (a reader that ends in between moves into the daemon's reaped-children time)."""

    def ticks(of: int, fields: slice) -> int:
        stat = Path(f"/proc/{of}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in stat[fields])

    total = ticks(pid, slice(11, 15))  # utime, stime, cutime, cstime
    for child in descendants(pid):
        try:
            total += ticks(child, slice(11, 13))
        except OSError:
            continue  # ended meanwhile: counted in its parent's reaped time
    return total / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (not ``pid`` itself)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        try:
            children = Path(f"/proc/{stack.pop()}/task").glob("*/children")
            kids = [int(k) for c in children for k in c.read_text().split()]
        except OSError:
            continue  # ended meanwhile
        found += kids
        stack += kids
    return found


def rss_kb(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) if found else 0


def timed_round_robin(
    fns: Sequence[Callable[[], Any]], times: int
) -> list[tuple[float, list[float], Any]]:
    """Each of ``fns`` once to warm, then ``times`` rounds of all of them, timed.

    For each: (median seconds, all seconds, last result).
    """
    results = [fn() for fn in fns]
    seconds: list[list[float]] = [[] for _ in fns]
    for _ in range(times):
        for i, fn in enumerate(fns):
            started = time.perf_counter()
            results[i] = fn()
            seconds[i].append(time.perf_counter() - started)
    return [(statistics.median(s), s, r) for s, r in zip(seconds, results, strict=True)]


# -- stores ----------------------------------------------------------------------------


def repos_for(blobs: int) -> int:
    """About 250 blobs (40 images) a repository: 200 at 50k, 4,000 at a million."""
    return max(20, blobs // 250)


def store(
    work: Path, blobs: int, revisions: int = 1, repos: int | None = None
) -> tuple[Path, dict[str, Any]]:
    """The synthetic store of about ``blobs`` blobs, made once and kept under ``work``;
    ``revisions``: manifests per tag (old revisions for untagged runs); ``repos``: fewer
    repositories than ``repos_for`` gives hold more tags each."""
    root = work / (f"store-{blobs}" if revisions == 1 else f"store-{blobs}-r{revisions}")
    if repos is not None:
        root = root.with_name(f"{root.name}-p{repos}")
    meta = root / "bench.json"
    if meta.exists():
        return root, json.loads(meta.read_text())
    if root.exists():
        shutil.rmtree(root)  # a half-written store from an interrupted run
    started = time.monotonic()
    plan = plan_for(root, blobs, repos or repos_for(blobs), 5, 0.1, 1, revisions)
    counts = generate(plan, os.cpu_count() or 2)
    counts["generate_seconds"] = round(time.monotonic() - started, 1)
    meta.write_text(json.dumps(counts))
    emit(bench="generate", store=str(root), **counts)
    return root, counts


def registry_config(work: Path, root: Path, read_only: bool = False) -> Path:
    """A distribution config for ``root``, read by both the peer and the daemon."""
    suffix = "-ro" if read_only else ""
    path = work / f"{root.name}{suffix}.yml"
    maintenance = "{uploadpurging: {enabled: false}"
    maintenance += ", readonly: {enabled: true}}" if read_only else "}"
    path.write_text(
        "version: 0.1\n"
        "log: {level: warn, formatter: text}\n"
        "storage:\n"
        f"  filesystem: {{rootdirectory: {root}}}\n"
        "  delete: {enabled: true}\n"
        f"  maintenance: {maintenance}\n"
        "http: {addr: 127.0.0.1:0, secret: bench}\n"
    )
    return path


def peer_env() -> dict[str, str]:
    # as tests/harness/registry.py: no REGISTRY_* overrides, no CA bundle for the Go SDK
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env.pop("AWS_CA_BUNDLE", None)
    return env


def ours_cmd(mode: str, config: Path, state: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "daemon",
        mode,
        "--registry-config",
        str(config),
        "--grace",
        "0",
        "--state-dir",
        str(state),
        "--log-level",
        "warning",
        *extra,
    ]


def would_delete(text: bytes) -> int:
    found = WOULD.search(text.decode(errors="replace"))
    if found is None:
        raise RuntimeError(f"no summary in: {text[-500:].decode(errors='replace')}")
    return int(found.group(1))


# -- figures ---------------------------------------------------------------------------


def bench_check(work: Path, blobs: int, times: int) -> dict[str, Any]:
    """Check time of the daemon (CLI and API) against garbage-collect and the floor."""
    root, counts = store(work, blobs)
    config = registry_config(work, root)
    state = work / "state"
    blobs_dir = root / "docker/registry/v2/blobs"

    def floor() -> int:
        out = subprocess.run(
            f"find {blobs_dir} -name data | wc -l", shell=True, check=True, capture_output=True
        )
        return int(out.stdout)

    def peer() -> Child:
        return run_child([*PEER_CHECK, str(config)], peer_env())

    def cli() -> Child:
        return run_child(ours_cmd("check", config, state))

    daemon = Daemon(config, work / "state-api", "--log-level", "warning", "--grace", "0").start()
    try:

        def api() -> dict[str, Any]:
            status, _h, body = daemon.request("POST", "/prune?mode=check&wait=true", timeout=3600)
            doc = json.loads(body)
            if status >= 300 or doc.get("state") != "succeeded":
                raise RuntimeError(f"API check: {status} {body[:500]!r}")
            return doc

        # round robin, not one contender after the other: load from others on the machine
        # then weighs on all four alike
        timings = timed_round_robin((floor, peer, cli, api), times)
        (floor_s, floor_all, found), (peer_s, peer_all, peer_run) = timings[:2]
        (cli_s, cli_all, cli_run), (api_s, api_all, api_doc) = timings[2:]
        with urllib.request.urlopen(f"{daemon.url}/runs/{api_doc['id']}/candidates") as resp:
            ours = {json.loads(line)["digest"] for line in resp.read().splitlines() if line}
    finally:
        daemon.stop()
    theirs = {m.decode() for m in ELIGIBLE.findall(peer_run.stdout)}
    cli_count = would_delete(cli_run.stdout)
    agree = ours == theirs and cli_count == len(theirs) == api_doc["summary"]["blobs"]
    if not agree:
        raise RuntimeError(
            f"candidates differ: peer {len(theirs)}, API {len(ours)}, CLI {cli_count}, "
            f"only peer {sorted(theirs - ours)[:3]}, only ours {sorted(ours - theirs)[:3]}"
        )
    return emit(
        bench="check",
        driver="filesystem",
        blobs=found,
        repositories=counts["repositories"],
        manifests=counts["manifests"],
        candidates=len(theirs),
        agree=agree,
        ours_cli_s=round(cli_s, 3),
        ours_api_s=round(api_s, 3),
        peer_s=round(peer_s, 3),
        floor_s=round(floor_s, 3),
        ratio_cli=round(peer_s / cli_s, 2),
        ratio_api=round(peer_s / api_s, 2),
        ours_vs_floor=round(cli_s / floor_s, 2),
        goal_ratio=GOAL_CHECK_RATIO,
        runs={
            "cli": [round(s, 3) for s in cli_all],
            "api": [round(s, 3) for s in api_all],
            "peer": [round(s, 3) for s in peer_all],
            "floor": [round(s, 3) for s in floor_all],
        },
        ours_cli_rss_mb=round(cli_run.max_rss_kb / 1024, 1),
        peer_rss_mb=round(peer_run.max_rss_kb / 1024, 1),
    )


def bench_untagged(work: Path, blobs: int, times: int, repos: int | None = None) -> dict[str, Any]:
    """An untagged check (CLI and API) against ``garbage-collect --dry-run --delete-untagged``
    on a store whose tags were each pushed 5 times (no indexes or referrers: equal answers)."""
    root, counts = store(work, blobs, revisions=5, repos=repos)
    config = registry_config(work, root)
    # the peer reads every tag's link of a repository for each of its manifests (2.8's
    # TagStore.Lookup): its cost grows with the tags a repository holds, ours does not
    per_repo = counts["manifests"] // counts["repositories"]

    def peer() -> Child:
        return run_child([*PEER_CHECK, "--delete-untagged", str(config)], peer_env())

    def cli() -> Child:
        return run_child(ours_cmd("check", config, work / "state", "--untagged"))

    daemon = Daemon(config, work / "state-api", "--log-level", "warning", "--grace", "0").start()
    api_cpu: list[float] = []
    try:

        def api() -> dict[str, Any]:
            assert daemon.proc is not None
            before = tree_cpu(daemon.proc.pid)
            status, _h, body = daemon.request(
                "POST", "/prune?mode=check&untagged=true&wait=true", timeout=3600
            )
            api_cpu.append(tree_cpu(daemon.proc.pid) - before)
            doc = json.loads(body)
            if status >= 300 or doc.get("state") != "succeeded":
                raise RuntimeError(f"API check: {status} {body[:500]!r}")
            return doc

        cpu: dict[str, list[float]] = {"peer": [], "cli": []}

        def metered(name: str, run: Callable[[], Child]) -> Callable[[], Child]:
            def one() -> Child:
                child = run()
                cpu[name].append(child.cpu_seconds)
                return child

            return one

        timings = timed_round_robin((metered("peer", peer), metered("cli", cli), api), times)
        (peer_s, peer_all, peer_run), (cli_s, cli_all, cli_run) = timings[:2]
        api_s, api_all, api_doc = timings[2]
        with urllib.request.urlopen(f"{daemon.url}/runs/{api_doc['id']}/candidates") as resp:
            ours = {json.loads(line)["digest"] for line in resp.read().splitlines() if line}
    finally:
        daemon.stop()
    theirs = {m.decode() for m in ELIGIBLE.findall(peer_run.stdout)}
    if ours != theirs or would_delete(cli_run.stdout) != len(theirs):
        raise RuntimeError(
            f"candidates differ: peer {len(theirs)}, ours {len(ours)}, "
            f"only peer {sorted(theirs - ours)[:3]}, only ours {sorted(ours - theirs)[:3]}"
        )
    return emit(
        bench="untagged",
        driver="filesystem",
        blobs=counts["blobs"],
        repositories=counts["repositories"],
        manifests=counts["manifests"],
        tags_per_repository=-(-per_repo // 5),
        untagged_manifests=api_doc["summary"]["manifests"],
        candidates=len(theirs),
        agree=True,
        ours_cli_s=round(cli_s, 3),
        ours_api_s=round(api_s, 3),
        peer_s=round(peer_s, 3),
        ratio_cli=round(peer_s / cli_s, 2),
        ratio_api=round(peer_s / api_s, 2),
        goal_ratio=GOAL_CHECK_RATIO,
        runs={
            "cli": [round(s, 3) for s in cli_all],
            "api": [round(s, 3) for s in api_all],
            "peer": [round(s, 3) for s in peer_all],
        },
        # CPU seconds (user + system, reader processes included) of the timed runs, the warm
        # one left out: what each needs whatever else loads the machine
        cpu={
            "cli": [round(s, 2) for s in cpu["cli"][1:]],
            "api": [round(s, 2) for s in api_cpu[1:]],
            "peer": [round(s, 2) for s in cpu["peer"][1:]],
        },
        cpu_ratio_cli=round(
            statistics.median(cpu["peer"][1:]) / statistics.median(cpu["cli"][1:]), 2
        ),
        cpu_ratio_api=round(statistics.median(cpu["peer"][1:]) / statistics.median(api_cpu[1:]), 2),
    )


_PEER_RSS: dict[int, int] = {}


def bench_rss(
    work: Path, blobs: int, peer: bool = True, mode: str = "check", in_place: bool = False
) -> dict[str, Any]:
    """Peak RSS of one warm CLI run, against an empty store's (the interpreter's own).

    ``mode`` "delete": the run deletes from a hard-link copy of the store (read-only config),
    warmed by a check first; its baseline is a delete of the empty store. ``in_place``: the
    delete runs on the store itself (a 1M store's copy needs ~2.9M more inodes), which is made
    again by the next run.
    """
    root, counts = store(work, blobs)
    empty = work / "store-empty"
    (empty / "docker/registry/v2/blobs").mkdir(parents=True, exist_ok=True)
    deleting = mode == "delete"
    if deleting:
        copy = root if in_place else work / f"delete-rss-{blobs}"
        if in_place:
            (root / "bench.json").unlink()  # spent: the next run makes it again
        else:
            _hardlink_copy(root, copy)
        config = registry_config(work, copy, read_only=True)
        base_config = registry_config(work, empty, read_only=True)
    else:
        config = registry_config(work, root)
        base_config = registry_config(work, empty)
    base = run_child(ours_cmd(mode, base_config, work / "state"))
    run_child(ours_cmd("check", config, work / "state"))  # warm the page cache
    child = run_child(ours_cmd(mode, config, work / "state"))
    extra: dict[str, Any] = {}
    if deleting:
        extra["deleted"] = would_delete(child.stdout)
        extra["left_on_disk"] = count_blobs(copy)
        if not in_place:
            shutil.rmtree(copy)
    if peer and not deleting and blobs not in _PEER_RSS:
        # minutes at a million blobs, and the same every time: once per store and command
        _PEER_RSS[blobs] = run_child([*PEER_CHECK, str(config)], peer_env()).max_rss_kb
    if blobs in _PEER_RSS:
        extra["peer_rss_mb"] = round(_PEER_RSS[blobs] / 1024, 1)
    total = counts["blobs"]
    rss = child.max_rss_kb * 1024
    return emit(
        bench="rss",
        driver="filesystem",
        mode=mode,
        blobs=total,
        peak_rss_mb=round(rss / 2**20, 1),
        bytes_per_blob=round(rss / total, 1),
        empty_store_rss_mb=round(base.max_rss_kb / 1024, 1),
        bytes_per_blob_above_empty=round((rss - base.max_rss_kb * 1024) / total, 1),
        seconds=round(child.seconds, 2),
        cpu_seconds=round(child.cpu_seconds, 2),
        cpu_us_per_blob=round(child.cpu_seconds / total * 1e6, 2),
        goal_bytes_per_blob=GOAL_BYTES_PER_BLOB,
        **extra,
    )


def count_blobs(root: Path) -> int:
    """Blob data files in a store."""
    base = root / "docker/registry/v2/blobs/sha256"
    total = 0
    for shard in os.scandir(base):
        for entry in os.scandir(shard.path):
            total += os.path.exists(os.path.join(entry.path, "data"))
    return total


def _hardlink_copy(src: Path, dst: Path) -> None:
    # a copy in hard links: deleting from it unlinks exactly what a real store would, and
    # the original stays whole for the next run
    if dst.exists():
        shutil.rmtree(dst)
    subprocess.run(["cp", "-al", str(src), str(dst)], check=True)


def bench_delete(work: Path, blobs: int) -> dict[str, Any]:
    """Orphans a second: our delete run (read-only config, grace 0) and garbage-collect."""
    root, _counts = store(work, blobs)
    ours_root = work / f"delete-ours-{blobs}"
    peer_root = work / f"delete-peer-{blobs}"
    _hardlink_copy(root, ours_root)
    _hardlink_copy(root, peer_root)
    config = registry_config(work, ours_root, read_only=True)
    # the same pages and dentries warm for both: one check of the copy first
    run_child(ours_cmd("check", config, work / "state"))
    daemon = Daemon(config, work / "state-delete", "--log-level", "warning").start()
    try:
        status, _h, body = daemon.request("POST", "/prune?mode=delete&grace=0")
        run = json.loads(body)["id"]
        if status != 202:
            raise RuntimeError(f"delete refused: {status} {body[:300]!r}")
        started = time.perf_counter()
        phase_started = None
        while True:
            with urllib.request.urlopen(f"{daemon.url}/runs/{run}") as resp:
                doc = json.loads(resp.read())
            if phase_started is None and doc["phase"] == "delete":
                phase_started = time.perf_counter()
            if doc["state"] != "running":
                break
            time.sleep(0.01)
        ended = time.perf_counter()
    finally:
        daemon.stop()
    if doc["state"] != "succeeded":
        raise RuntimeError(f"delete run {doc['state']}: {doc.get('error')}")
    deleted = doc["summary"]["blobs"]
    phase_s = ended - (phase_started or started)
    peer_config = registry_config(work, peer_root)
    run_child([*PEER_CHECK, str(peer_config)], peer_env())
    peer = run_child(["docker-registry", "garbage-collect", str(peer_config)], peer_env())
    before = count_blobs(root)
    left = count_blobs(ours_root)
    peer_deleted = before - count_blobs(peer_root)
    shutil.rmtree(ours_root)
    shutil.rmtree(peer_root)
    whole_s = ended - started
    return emit(
        bench="delete",
        driver="filesystem",
        blobs=before,
        deleted=deleted,
        deleted_on_disk=before - left,
        ours_run_s=round(whole_s, 3),
        ours_delete_phase_s=round(phase_s, 3),
        ours_blobs_per_s_run=round(deleted / whole_s),
        ours_blobs_per_s_delete_phase=round(deleted / phase_s),
        peer_deleted=peer_deleted,
        peer_run_s=round(peer.seconds, 3),
        peer_blobs_per_s_run=round(peer_deleted / peer.seconds),
        ratio_run=round(peer.seconds / whole_s, 2),
    )


def bench_status(work: Path, blobs: int) -> dict[str, Any]:
    """bench/status_latency.py on the kept store: GET /runs/latest during 3 checks."""
    root, _counts = store(work, blobs)
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench/status_latency.py"), "--store", str(root)],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    doc = json.loads(out.stdout.decode().strip().splitlines()[-1])
    doc.pop("blobs", None)
    return emit(bench="status", blobs=blobs, **doc)


# -- commands --------------------------------------------------------------------------

MEDIAN_KEYS = {
    "check": (
        "ours_cli_s",
        "ours_api_s",
        "peer_s",
        "floor_s",
        "ratio_cli",
        "ratio_api",
        "ours_vs_floor",
    ),
    "rss": (
        "peak_rss_mb",
        "bytes_per_blob",
        "bytes_per_blob_above_empty",
        "seconds",
        "cpu_seconds",
    ),
    "delete": (
        "ours_blobs_per_s_run",
        "ours_blobs_per_s_delete_phase",
        "peer_blobs_per_s_run",
        "ratio_run",
    ),
    "status": ("p50_ms", "p99_ms", "max_ms"),
}


def summarize(results: list[dict[str, Any]]) -> None:
    """Medians over repetitions, one line per figure and size."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for doc in results:
        size = doc.get("blobs") or 0
        groups.setdefault((doc["bench"], size), []).append(doc)
    for (bench, size), docs in groups.items():
        line: dict[str, Any] = {"summary": bench, "blobs": size, "repeats": len(docs)}
        for key in MEDIAN_KEYS.get(bench, ()):
            values = [d[key] for d in docs if isinstance(d.get(key), int | float)]
            if values:
                line[key] = statistics.median(values)
        line["load_seen"] = [min(d["load"][0] for d in docs), max(d["load"][0] for d in docs)]
        emit(**line)


def bench_verify(work: Path, blobs: int, times: int) -> dict[str, Any]:
    """mode=verify next to a check, CLI and API, in round robin on the same store."""
    root, counts = store(work, blobs)
    config = registry_config(work, root)
    state = work / "state"

    def cli(mode: str) -> Callable[[], Child]:
        return lambda: run_child(ours_cmd(mode, config, state))

    daemon = Daemon(config, work / "state-api", "--log-level", "warning", "--grace", "0").start()
    try:

        def api(mode: str) -> Callable[[], dict[str, Any]]:
            def one() -> dict[str, Any]:
                # the plain check (no per-repository usage, as the CLI's): the cheaper one,
                # so the ratio is the strict one
                usage = "&usage=false" if mode == "check" else ""
                path = f"/prune?mode={mode}&wait=true{usage}"
                assert daemon.proc is not None
                before = tree_cpu(daemon.proc.pid)  # the daemon and its reader processes
                status, _h, body = daemon.request("POST", path, timeout=3600)
                doc = json.loads(body)
                if status >= 300 or doc.get("state") != "succeeded":
                    raise RuntimeError(f"API {mode}: {status} {body[:500]!r}")
                doc["cpu_s"] = tree_cpu(daemon.proc.pid) - before
                return doc

            return one

        loads: list[float] = []

        def noting_load(fn: Callable[[], Any]) -> Callable[[], Any]:
            def one() -> Any:
                loads.append(round(os.getloadavg()[0], 2))  # before each run, warm-up too
                return fn()

            return one

        cpu: list[list[float]] = [[], [], [], []]

        def noting_cpu(i: int, fn: Callable[[], Any]) -> Callable[[], Any]:
            def one() -> Any:
                result = fn()
                cpu[i].append(result.cpu_seconds if isinstance(result, Child) else result["cpu_s"])
                return result

            return one

        fns = (cli("check"), cli("verify"), api("check"), api("verify"))
        timings = timed_round_robin(
            [noting_load(noting_cpu(i, fn)) for i, fn in enumerate(fns)], times
        )
    finally:
        daemon.stop()
    # CPU seconds (main process and readers) of the timed rounds, the warm-up left out: less
    # exposed to other sessions' load than wall time
    cpu_check, cpu_verify, cpu_api_check, cpu_api_verify = (statistics.median(c[1:]) for c in cpu)
    (check_s, check_all, _c), (verify_s, verify_all, verify_run) = timings[:2]
    (api_check_s, api_check_all, _a), (api_verify_s, api_verify_all, api_doc) = timings[2:]
    return emit(
        bench="verify",
        blobs=counts.get("blobs"),
        manifests=counts.get("manifests"),
        check_cli_s=round(check_s, 2),
        verify_cli_s=round(verify_s, 2),
        ratio_cli=round(verify_s / check_s, 2),
        check_api_s=round(api_check_s, 2),
        verify_api_s=round(api_verify_s, 2),
        ratio_api=round(api_verify_s / api_check_s, 2),
        goal_met=max(verify_s / check_s, api_verify_s / api_check_s) <= GOAL_VERIFY_RATIO,
        cpu_cli_s=[round(cpu_check, 2), round(cpu_verify, 2)],
        cpu_ratio_cli=round(cpu_verify / cpu_check, 2),
        cpu_api_s=[round(cpu_api_check, 2), round(cpu_api_verify, 2)],
        cpu_ratio_api=round(cpu_api_verify / cpu_api_check, 2),
        load_min_max=[min(loads), max(loads)],
        loads=loads,
        verify_rss_mb=round(verify_run.max_rss_kb / 1024, 1),
        images_verified=api_doc["verification"]["images"],
        rounds={
            "check_cli": [round(x, 2) for x in check_all],
            "verify_cli": [round(x, 2) for x in verify_all],
            "check_api": [round(x, 2) for x in api_check_all],
            "verify_api": [round(x, 2) for x in api_verify_all],
        },
        summary=verify_run.stdout.decode(errors="replace").strip().splitlines()[-1:],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "command",
        choices=("all", "store", "check", "rss", "delete", "status", "s3", "verify", "untagged"),
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/pruned-bench"))
    parser.add_argument("--blobs", type=int, action="append", help="store sizes (repeatable)")
    parser.add_argument("--times", type=int, default=3, help="timed runs after the warm one")
    parser.add_argument("--repeat", type=int, default=1, help="repeat the whole command")
    parser.add_argument(
        "--repos",
        type=int,
        help="untagged: repositories in the store (default about one per 250 blobs, ~7 tags "
        "each at 5 revisions a tag; fewer repositories hold more tags each)",
    )
    parser.add_argument("--no-peer", action="store_true", help="rss: ours only (minutes at 1M)")
    parser.add_argument("--mode", choices=("check", "delete"), default="check", help="rss's run")
    parser.add_argument("--in-place", action="store_true", help="rss --mode delete: no copy")
    args, rest = parser.parse_known_args(argv)
    if args.command == "s3":
        # the S3 figures (check vs garbage-collect on SeaweedFS, delete rate) are that
        # script's, on the same stores
        script = [sys.executable, str(ROOT / "bench/s3_check.py"), "--work", str(args.work)]
        for n in args.blobs or (50_000,):
            code = subprocess.call([*script, "--blobs", str(n), *rest])
            if code:
                return code
        return 0
    if rest:
        parser.error(f"unknown arguments: {rest}")
    args.work.mkdir(parents=True, exist_ok=True)
    installed_bytecode()
    emit(
        bench="machine",
        nproc=os.cpu_count(),
        mem_total_gb=round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        python=sys.version.split()[0],
        peer=subprocess.run(
            ["docker-registry", "--version"], capture_output=True, text=True
        ).stdout.strip(),
    )
    plan: list[tuple[str, int]] = []
    sizes = args.blobs
    if args.command in ("all", "check"):
        plan += [("check", n) for n in sizes or (50_000, 500_000)]
    if args.command == "store":
        # the stores alone, e.g. at nice 19 before a measured run under a lock
        for n in sizes or (1_000_000,):
            store(args.work, n)
        return 0
    if args.command in ("all", "rss"):
        plan += [("rss", n) for n in sizes or (100_000, 1_000_000)]
    if args.command in ("all", "delete"):
        plan += [("delete", n) for n in sizes or (50_000,)]
    if args.command in ("all", "status"):
        plan += [("status", n) for n in sizes or (500_000,)]
    if args.command in ("all", "verify"):
        plan += [("verify", n) for n in sizes or (50_000, 500_000)]
    if args.command in ("all", "untagged"):
        plan += [("untagged", n) for n in sizes or (50_000,)]
    for _bench, n in plan:
        # all stores first: generating is not measured
        if _bench == "untagged":
            store(args.work, n, revisions=5, repos=args.repos)
        else:
            store(args.work, n)
    results: list[dict[str, Any]] = []
    for _ in range(args.repeat):
        for bench, n in plan:
            if bench == "check":
                results.append(bench_check(args.work, n, args.times))
            elif bench == "rss":
                results.append(bench_rss(args.work, n, not args.no_peer, args.mode, args.in_place))
            elif bench == "delete":
                results.append(bench_delete(args.work, n))
            elif bench == "verify":
                results.append(bench_verify(args.work, n, args.times))
            elif bench == "untagged":
                results.append(bench_untagged(args.work, n, args.times, args.repos))
            else:
                results.append(bench_status(args.work, n))
    summarize(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
