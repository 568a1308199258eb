"""S3 check and delete speed against distribution's garbage-collect, on a local SeaweedFS.

    python bench/s3_check.py [--blobs 48000] [--repos 200] [--repeats 3] [--workdir DIR]

One run measures, on one bucket: the daemon's check (CLI wall time and the engine in
process), ``docker-registry garbage-collect --dry-run`` on the same bucket (both must find
the same candidates), the floor (one flat ListObjectsV2 of the whole bucket), then the
deletion rate of the orphans (at least 10,000) with the registry config read-only.

Orphans come two ways, as in a real registry: blobs never referenced (bench/synth.py's
orphans) and images deleted through the API (revision link and tags gone, their blobs and
layer links left behind). The synthetic store and SeaweedFS's data stay in ``--workdir``;
the next run uploads again only what the last delete removed. Figures go to stdout as JSON
lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synth import generate, plan_for  # noqa: E402
from daemon import layout, logs  # noqa: E402
from daemon.config import load_settings  # noqa: E402
from daemon.progress import Progress  # noqa: E402
from daemon.prune import CHECK, Candidate, Engine, RunOptions  # noqa: E402
from daemon.sources.storage import StorageSource  # noqa: E402
from daemon.storage import open_storage  # noqa: E402
from tests.harness.seaweed import SeaweedFS  # noqa: E402

BUCKET = "bench"
ELIGIBLE = re.compile(rb"^blob eligible for deletion: (sha256:[0-9a-f]{64})", re.MULTILINE)
WOULD = re.compile(r"^Would delete (\d+) blobs$", re.MULTILINE)
#: manifests whose digest starts with one of these are deleted through the API (about 3/16)
DELETED_IMAGES = ("0", "1", "2")
GOAL_RATIO = 10.0
GOAL_DELETE_RATE = 2000.0


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def load_store(store: Path) -> dict[str, bytes]:
    """Every object key (relative to the bucket root) of the filesystem store, with content;
    the images chosen as deleted lose their revision link and their tags."""
    v2 = store / layout.V2_ROOT
    objects: dict[str, bytes] = {}
    for directory, _dirs, files in os.walk(v2):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                objects[f"{layout.V2_ROOT}/{os.path.relpath(path, v2)}"] = handle.read()
    revisions = [key for key in objects if "/_manifests/revisions/sha256/" in key]
    deleted = {key.split("/")[-2] for key in revisions if key.split("/")[-2][0] in DELETED_IMAGES}
    # what DELETE /v2/<name>/manifests/<digest> removes: the revision link, every tag naming it
    gone = {key for key in revisions if key.split("/")[-2] in deleted}
    gone_tags = {
        key.removesuffix("current/link")
        for key, data in objects.items()
        if key.endswith("/current/link") and data.decode().removeprefix("sha256:") in deleted
    }
    return {
        key: data
        for key, data in objects.items()
        if key not in gone and _tag_dir(key) not in gone_tags
    }


def _tag_dir(key: str) -> str | None:
    """``.../_manifests/tags/<tag>/`` for a key below a tag, else None."""
    head, found, rest = key.partition("/_manifests/tags/")
    return f"{head}/_manifests/tags/{rest.split('/', 1)[0]}/" if found else None


def prepare(args: argparse.Namespace) -> tuple[SeaweedFS, dict[str, Any]]:
    """The synthetic store (generated once), SeaweedFS started, the bucket made complete."""
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / f"store-{args.blobs}-{args.repos}-{args.orphans}"
    marker = store / "counts.json"
    if not marker.exists():
        started = time.monotonic()
        plan = plan_for(store, args.blobs, args.repos, 5, args.orphans, 1)
        counts = generate(plan, os.cpu_count() or 2)
        counts["seconds"] = round(time.monotonic() - started, 1)
        marker.write_text(json.dumps(counts))
    counts = json.loads(marker.read_text())
    objects = load_store(store)
    weed = SeaweedFS(workdir=workdir / "weed").start()
    weed.create_bucket(BUCKET)
    present = set(weed.keys(BUCKET))
    missing = {key: data for key, data in objects.items() if key not in present}
    extra = present - objects.keys()
    started = time.monotonic()
    if missing:
        asyncio.run(weed.seed(BUCKET, missing, concurrency=32))
    if extra:
        client = weed.client()
        ordered = sorted(extra)
        for i in range(0, len(ordered), 1000):
            chunk = [{"Key": key} for key in ordered[i : i + 1000]]
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": chunk, "Quiet": True})
    blobs = sum(1 for key in objects if key.endswith("/data") and "/blobs/" in key)
    info = {
        "synthetic": counts,
        "objects": len(objects),
        "blobs": blobs,
        "uploaded": len(missing),
        "removed": len(extra),
        "upload_seconds": round(time.monotonic() - started, 1),
    }
    return weed, info


def registry_config(weed: SeaweedFS, path: Path, read_only: bool) -> Path:
    """A distribution config with the S3 driver on the bench bucket (the daemon reads it too)."""
    storage: dict[str, Any] = {
        "s3": {
            "bucket": BUCKET,
            "region": weed.region,
            "regionendpoint": weed.endpoint,
            "accesskey": weed.access_key,
            "secretkey": weed.secret_key,
            "secure": False,
            "forcepathstyle": True,
            "v4auth": True,
        },
        "delete": {"enabled": True},
        "redirect": {"disable": True},
    }
    if read_only:
        storage["maintenance"] = {"readonly": {"enabled": True}}
    doc = {"version": 0.1, "log": {"level": "warn"}, "storage": storage}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def child_env(registry: bool) -> dict[str, str]:
    """The environment without overrides that would make the config file lie."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "PRUNER_"))}
    if registry:
        # the Go AWS SDK in docker-registry panics with a CA bundle and a plain-http endpoint
        env.pop("AWS_CA_BUNDLE", None)
    return env


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def _cpu(pid: int | None) -> tuple[float, float]:
    """(CPU seconds of this process and its waited-for children, of the process ``pid``)."""
    own = sum(
        usage.ru_utime + usage.ru_stime
        for usage in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
    store = 0.0
    if pid is not None:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        store = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own, store


def metered(fn: Callable[[], Any], pid: int | None) -> tuple[float, float, float, Any]:
    """(wall seconds, client CPU seconds, store CPU seconds, result) of ``fn()``: the CPU
    figures say how much work each tool made, whatever else loads the machine."""
    own, store = _cpu(pid)
    seconds, result = timed(fn)
    own_after, store_after = _cpu(pid)
    return seconds, own_after - own, store_after - store, result


def floor(weed: SeaweedFS) -> int:
    """One flat, sequential ListObjectsV2 of the whole bucket: the least any tool must do."""
    count = 0
    paginator = weed.client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=BUCKET, PaginationConfig={"PageSize": 1000}):
        count += len(page.get("Contents", []))
    return count


def peer(config: Path) -> set[str]:
    proc = subprocess.run(
        ["docker-registry", "garbage-collect", "--dry-run", str(config)],
        capture_output=True,
        env=child_env(registry=True),
        timeout=1800,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"garbage-collect failed: {proc.stderr.decode()[-2000:]}")
    return {m.decode() for m in ELIGIBLE.findall(proc.stdout + proc.stderr)}


def cli(mode: str, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            mode,
            "--registry-config",
            str(config),
            "--grace",
            "0",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=child_env(registry=False),
        cwd=ROOT,
        timeout=1800,
        check=False,
    )


def cli_check(config: Path) -> int:
    result = cli("check", config)
    found = WOULD.search(result.stdout)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"check failed ({result.returncode}): {result.stderr[-2000:]}")
    return int(found.group(1))


async def engine_check(config: Path) -> tuple[set[str], dict[str, float]]:
    """The engine in process: the candidates, and seconds spent in each phase."""
    settings = load_settings(config, env={})
    log = logs.make_logger("warning", "json", sys.stderr)
    storage = open_storage(settings.storage, settings.workers)
    found: set[str] = set()

    def collect(candidate: Candidate) -> None:
        found.add(layout.format_digest(candidate.digest))

    progress = Progress()
    engine = Engine(
        storage,
        StorageSource(settings.workers, log),
        RunOptions(mode=CHECK, grace=0),
        progress,
        on_candidate=collect,
        log=log,
    )
    phases: dict[str, float] = {}
    current = [progress.phase, time.perf_counter()]

    def note() -> None:
        # the phase seen last ran from when it was first seen until now
        now = time.perf_counter()
        if progress.phase != current[0]:
            phases[current[0]] = phases.get(current[0], 0.0) + now - current[1]
            current[:] = [progress.phase, now]

    async def watch() -> None:
        while True:
            await asyncio.sleep(0.002)
            note()

    watcher = asyncio.create_task(watch())
    try:
        await engine.run()
    finally:
        watcher.cancel()
        await storage.close()
    note()
    return found, {k: round(v, 3) for k, v in phases.items() if k not in ("starting", "done")}


def _ts(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00")).timestamp()


def delete_run(config: Path) -> dict[str, Any]:
    """The CLI's delete; the rate from the log: sweep's end to the last blob deleted."""
    seconds, result = timed(lambda: cli("delete", config, "--log-level", "info"))
    if result.returncode != 0:
        raise SystemExit(f"delete failed ({result.returncode}): {result.stderr[-2000:]}")
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    swept = next(line for line in lines if line.get("event") == "swept")
    deleted = [line for line in lines if str(line.get("event", "")).startswith("Deleted blob: ")]
    span = _ts(deleted[-1]) - _ts(swept)
    return {
        "deleted": len(deleted),
        "candidates": swept["candidates"],
        "delete_phase_seconds": round(span, 3),
        "blobs_per_s": round(len(deleted) / span) if span > 0 else None,
        "cli_seconds": round(seconds, 2),
        "summary": result.stdout.splitlines()[:2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=48_000)
    parser.add_argument("--repos", type=int, default=200)
    parser.add_argument("--orphans", type=float, default=0.1, help="never-referenced fraction")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pruned-bench-s3"))
    parser.add_argument("--no-delete", action="store_true", help="measure the check only")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    weed, info = prepare(args)
    try:
        emit(store=info, loadavg=[round(x, 2) for x in os.getloadavg()])
        config = registry_config(weed, args.workdir / "config.yml", read_only=False)
        read_only = registry_config(weed, args.workdir / "config-ro.yml", read_only=True)

        pid = weed.process.pid if weed.process is not None else None
        tools: dict[str, Callable[[], Any]] = {
            "floor": lambda: floor(weed),
            "ours_cli": lambda: cli_check(config),
            "ours_engine": lambda: asyncio.run(engine_check(config)),
            "peer": lambda: peer(config),
        }
        runs: dict[str, list[float]] = {name: [] for name in tools}
        cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in tools}
        answers: dict[str, Any] = {}
        phases: list[dict[str, float]] = []
        for _ in range(args.repeats):
            for name, tool in tools.items():
                seconds, client_cpu, store_cpu, answers[name] = metered(tool, pid)
                runs[name].append(seconds)
                cpu[name].append((client_cpu, store_cpu))
            answers["ours_engine"], phase = answers["ours_engine"]
            phases.append(phase)
            emit(
                round={k: round(v[-1], 3) for k, v in runs.items()},
                cpu={k: [round(x, 2) for x in v[-1]] for k, v in cpu.items()},
                phases=phase,
                loadavg=[round(x, 2) for x in os.getloadavg()],
            )

        same = answers["ours_engine"] == answers["peer"]
        candidates = len(answers["peer"])
        if not same or answers["ours_cli"] != candidates:
            raise SystemExit(
                f"answers differ: peer {candidates}, engine {len(answers['ours_engine'])}, "
                f"cli {answers['ours_cli']}, "
                f"only ours {len(answers['ours_engine'] - answers['peer'])}, "
                f"only peer {len(answers['peer'] - answers['ours_engine'])}"
            )
        work: dict[str, float] = {}
        for name, values in runs.items():
            client = median([c for c, _s in cpu[name]])
            store = median([s for _c, s in cpu[name]])
            work[name] = client + store
            emit(
                measure=name,
                seconds=[round(v, 3) for v in values],
                median=median(values),
                client_cpu_median=client,
                store_cpu_median=store,
            )
        emit(
            measure="engine_phases_median",
            **{k: median([p.get(k, 0.0) for p in phases]) for k in phases[0]},
        )
        ours_cli, ours_engine, peer_s = (
            median(runs["ours_cli"]),
            median(runs["ours_engine"]),
            median(runs["peer"]),
        )
        ratios = {
            "candidates": candidates,
            "same_candidates": same,
            "listed_keys": answers["floor"],
            "peer_over_ours_cli": round(peer_s / ours_cli, 1),
            "peer_over_ours_engine": round(peer_s / ours_engine, 1),
            "ours_cli_over_floor": round(ours_cli / median(runs["floor"]), 2),
            "ours_engine_over_floor": round(ours_engine / median(runs["floor"]), 2),
            # CPU seconds (client + SeaweedFS) the peer needs for each one of ours
            "peer_over_ours_cli_cpu": round(work["peer"] / work["ours_cli"], 1),
            "goal_ratio": GOAL_RATIO,
            "check_goal_met": peer_s / ours_cli >= GOAL_RATIO,
        }
        emit(ratios=ratios)

        if not args.no_delete:
            if candidates < 10_000:
                emit(warning=f"only {candidates} orphans; the goal is measured on 10,000")
            result = delete_run(read_only)
            result["goal_blobs_per_s"] = GOAL_DELETE_RATE
            result["delete_goal_met"] = (result["blobs_per_s"] or 0) >= GOAL_DELETE_RATE
            emit(measure="delete", **result)
            left, _phases = asyncio.run(engine_check(config))
            emit(measure="after_delete", candidates_left=len(left))
        emit(loadavg_end=[round(x, 2) for x in os.getloadavg()])
    finally:
        weed.stop()


if __name__ == "__main__":
    main()
