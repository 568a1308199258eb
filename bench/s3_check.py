"""S3 benchmarks on a local SeaweedFS, against distribution's garbage-collect, in one run.

    python bench/s3_check.py [--blobs 50000] [--repeats 3] [--work DIR] [--no-delete]
                             [--untagged] [--ours-only] [--upload-only]

``--upload-only`` makes the bucket complete and stops (the upload is not measured: run it at
nice 19, outside the bench lock). ``--ours-only`` runs the CLI check alone, then a check and
a delete of an empty bucket in the same SeaweedFS for the baseline, then (without
``--no-delete``) the CLI delete: peak RSS, bytes per blob above the empty bucket, CPU seconds.

With ``--untagged`` the store's tags were each pushed 5 times (bench/synth.py --revisions 5)
and the contenders are an untagged check and ``garbage-collect --dry-run --delete-untagged``.

One run measures, on one bucket: the daemon's check (CLI wall time and peak RSS, the API of a
``serve`` process, the engine in process for its phases), ``docker-registry garbage-collect
--dry-run`` on the same bucket (all must find the same candidates) and the floor (one flat
ListObjectsV2 of the whole bucket); then the deletion rate of the orphans with the registry
config read-only.

The store is bench/run.py's, made in memory from the same plan and uploaded straight to the
bucket, so the filesystem and S3 figures come from the same images. Orphans come two ways,
as in a real registry: blobs never referenced (bench/synth.py's orphans) and images deleted
through the API (revision link and tags gone, their blobs and layer links left behind).
SeaweedFS keeps its data in ``<work>/weed-<blobs>``, one instance and bucket per store size;
a bucket known complete is not listed again, and the next run uploads again only what the
last delete removed. Figures go to stdout as JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    ELIGIBLE,
    PEER_CHECK,
    installed_bytecode,
    ours_cmd,
    peer_env,
    repos_for,
    run_child,
    would_delete,
)
from bench.synth import in_memory, made, plan_for  # noqa: E402
from daemon import layout, logs  # noqa: E402
from daemon.config import load_settings  # noqa: E402
from daemon.progress import Progress  # noqa: E402
from daemon.prune import CHECK, Candidate, Engine, RunOptions  # noqa: E402
from daemon.sources.storage import StorageSource  # noqa: E402
from daemon.storage import open_storage  # noqa: E402
from tests.harness.daemon import Daemon  # noqa: E402
from tests.harness.seaweed import SeaweedFS  # noqa: E402

#: manifests whose digest starts with one of these are deleted through the API (about 3/16)
DELETED_IMAGES = ("0", "1", "2")
GOAL_RATIO = 10.0
#: the one blob of the baseline's store: the sha256 of no bytes
ONE = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
GOAL_DELETE_RATE = 2000.0


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def store_objects(
    blobs: int, revisions: int = 1, repos: int | None = None
) -> tuple[dict[str, bytes], dict[str, int]]:
    """bench/run.py's store of about ``blobs`` blobs, made in memory as bucket keys, with the
    images chosen as deleted gone as the registry's API deletes them; and its counts."""
    plan = plan_for(Path("."), blobs, repos or repos_for(blobs), 5, 0.1, 1, revisions)
    processes = os.cpu_count() or 2  # bench/run.py's cut, so the same content as its store
    objects: dict[str, bytes] = {}
    for part in made(plan, processes, in_memory):
        objects.update(part)
    revisions = [key for key in objects if "/_manifests/revisions/sha256/" in key]
    deleted = {key.split("/")[-2] for key in revisions if key.split("/")[-2][0] in DELETED_IMAGES}
    # what DELETE /v2/<name>/manifests/<digest> removes: the revision link, every tag naming it
    gone = {key for key in revisions if key.split("/")[-2] in deleted}
    gone_tags = {
        key.removesuffix("current/link")
        for key, data in objects.items()
        if key.endswith("/current/link") and data.decode().removeprefix("sha256:") in deleted
    }
    counts = {
        "repositories": plan.repos,
        "manifests": len(revisions),
        "deleted_images": len(deleted),
        "blobs": sum(key.endswith("/data") for key in objects),
        "orphans": plan.orphans,
    }
    kept = {
        key: data
        for key, data in objects.items()
        if key not in gone and _tag_dir(key) not in gone_tags
    }
    return kept, counts


def _tag_dir(key: str) -> str | None:
    """``.../_manifests/tags/<tag>/`` for a key below a tag, else None."""
    head, found, rest = key.partition("/_manifests/tags/")
    return f"{head}/_manifests/tags/{rest.split('/', 1)[0]}/" if found else None


def revisions_of(args: argparse.Namespace) -> int:
    return 5 if args.untagged else 1


def bucket_for(blobs: int, revisions: int = 1, repos: int | None = None) -> str:
    name = f"bench-{blobs}" if revisions == 1 else f"bench-{blobs}-r{revisions}"
    return name if repos is None else f"{name}-p{repos}"


def weed_dir(args: argparse.Namespace) -> Path:
    bucket = bucket_for(args.blobs, revisions_of(args), args.repos)
    return args.work / f"weed-{bucket.removeprefix('bench-')}"


def prepare(args: argparse.Namespace) -> tuple[SeaweedFS, dict[str, Any]]:
    """SeaweedFS started, and the bucket of the synthetic store made complete."""
    bucket = bucket_for(args.blobs, revisions_of(args), args.repos)
    # one SeaweedFS per store: its filer slows down with every object it holds, and the
    # 1M bucket next to the 50k one made the 50k check's requests cost ~1.7 times the CPU
    weed = SeaweedFS(workdir=weed_dir(args)).start()
    weed.create_bucket(bucket)
    return weed, fill_bucket(weed, args)


def fill_bucket(weed: SeaweedFS, args: argparse.Namespace) -> dict[str, Any]:
    """The bucket made the synthetic store again: what a delete removed uploaded, what is not
    the store's (a trash) removed."""
    bucket = bucket_for(args.blobs, revisions_of(args), args.repos)
    complete = weed_dir(args) / f"{bucket}.complete"
    meta = weed_dir(args) / f"{bucket}.json"
    started = time.monotonic()
    missing: dict[str, bytes] = {}
    extra: set[str] = set()
    objects: dict[str, bytes] = {}
    if not complete.exists() or not meta.exists():
        # the whole store in memory (~1 GB at a million blobs): only when the bucket needs it
        objects, counts = store_objects(args.blobs, revisions_of(args), args.repos)
        meta.write_text(json.dumps(counts))
    if not complete.exists():
        # a million keys take minutes to list: done only when the last run may have changed
        # the bucket (a delete, or an interrupted upload)
        present = set(weed.keys(bucket))
        missing = {key: data for key, data in objects.items() if key not in present}
        extra = present - objects.keys()
    if missing:
        asyncio.run(weed.seed(bucket, missing, concurrency=32))
    if extra:
        client = weed.client()
        ordered = sorted(extra)
        for i in range(0, len(ordered), 1000):
            chunk = [{"Key": key} for key in ordered[i : i + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
    complete.touch()
    counts = json.loads(meta.read_text())
    loaded, uploaded = len(objects), len(missing)
    objects.clear()  # gigabytes at a million blobs, while the contenders run
    missing.clear()
    info = {
        "synthetic": counts,
        "bucket": bucket,
        "objects": loaded or "not made: the bucket was complete",
        "blobs": counts["blobs"],
        "uploaded": uploaded,
        "removed": len(extra),
        "upload_seconds": round(time.monotonic() - started, 1),
    }
    return info


def registry_config(weed: SeaweedFS, bucket: str, path: Path, read_only: bool) -> Path:
    """A distribution config with the S3 driver on ``bucket`` (the daemon reads it too)."""
    storage: dict[str, Any] = {
        "s3": {
            "bucket": bucket,
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


def _cpu_of(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu(daemon: int | None, store_pid: int | None) -> tuple[float, float]:
    """(CPU seconds of this process, its waited-for children and the daemon, of SeaweedFS)."""
    own = sum(
        usage.ru_utime + usage.ru_stime
        for usage in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
    return own + _cpu_of(daemon), _cpu_of(store_pid)


def metered(
    fn: Callable[[], Any], daemon: int | None, store_pid: int | None
) -> tuple[float, float, float, Any]:
    """(wall seconds, client CPU seconds, store CPU seconds, result) of ``fn()``: the CPU
    figures say how much work each tool made, whatever else loads the machine."""
    own, weed = _cpu(daemon, store_pid)
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    own_after, weed_after = _cpu(daemon, store_pid)
    return seconds, own_after - own, weed_after - weed, result


def floor(weed: SeaweedFS, bucket: str) -> int:
    """One flat, sequential ListObjectsV2 of the whole bucket: the least any tool must do."""
    count = 0
    paginator = weed.client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, PaginationConfig={"PageSize": 1000}):
        count += len(page.get("Contents", []))
    return count


def peer(config: Path, untagged: bool = False) -> tuple[set[str], int]:
    """garbage-collect --dry-run: its candidates and its peak RSS (KiB)."""
    extra = ["--delete-untagged"] if untagged else []
    child = run_child([*PEER_CHECK, *extra, str(config)], peer_env())
    return {m.decode() for m in ELIGIBLE.findall(child.stdout)}, child.max_rss_kb


def cli_check(config: Path, state: Path, untagged: bool = False) -> tuple[int, int]:
    """``python -m daemon check``: its candidate count and its peak RSS (KiB)."""
    child = run_child(ours_cmd("check", config, state, *(["--untagged"] if untagged else [])))
    return would_delete(child.stdout), child.max_rss_kb


def api_check(daemon: Daemon, untagged: bool = False) -> set[str]:
    """POST /prune?mode=check&wait=true to a serve process, then its candidates."""
    query = "mode=check&wait=true" + ("&untagged=true" if untagged else "")
    status, _h, body = daemon.request("POST", f"/prune?{query}", timeout=7200)
    doc = json.loads(body)
    if status >= 300 or doc.get("state") != "succeeded":
        raise SystemExit(f"API check: {status} {body[:500]!r}")
    status, _h, body = daemon.request("GET", f"/runs/{doc['id']}/candidates", timeout=600)
    return {json.loads(line)["digest"] for line in body.splitlines() if line}


async def engine_check(config: Path, untagged: bool = False) -> tuple[set[str], dict[str, float]]:
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
        RunOptions(mode=CHECK, grace=0, untagged=untagged),
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


def delete_run(config: Path, state: Path, *extra: str) -> dict[str, Any]:
    """The CLI's delete; the rate from the log: sweep's end to the last blob deleted."""
    child = run_child(ours_cmd("delete", config, state, "--log-level", "info", *extra))
    lines = [json.loads(line) for line in child.stdout.splitlines() if line.startswith(b"{")]
    swept = next(line for line in lines if line.get("event") == "swept")
    deleted = [line for line in lines if str(line.get("event", "")).startswith("Deleted blob: ")]
    span = _ts(deleted[-1]) - _ts(swept)
    return {
        "deleted": len(deleted),
        "candidates": swept["candidates"],
        "delete_phase_seconds": round(span, 3),
        "blobs_per_s": round(len(deleted) / span) if span > 0 else None,
        "cli_seconds": round(child.seconds, 2),
        "cli_cpu_seconds": round(child.cpu_seconds, 2),
        "peak_rss_kb": child.max_rss_kb,
        "summary": [
            line.decode()
            for line in child.stdout.splitlines()
            if line.startswith((b"Del", b"Fre", b"Mov"))
        ],
    }


def empty_bucket_rss(weed: SeaweedFS, args: argparse.Namespace, state: Path) -> tuple[int, int]:
    """Peak RSS (KiB) of a CLI check, and of a CLI delete, of an empty store (one orphan blob:
    a bucket without registry data is refused) in the same SeaweedFS: the interpreter, its
    imports and the client, which the store does not grow."""
    bucket = "bench-empty"
    weed.create_bucket(bucket)
    client = weed.client()
    check = registry_config(weed, bucket, args.work / f"{bucket}.yml", read_only=False)
    delete = registry_config(weed, bucket, args.work / f"{bucket}-ro.yml", read_only=True)
    client.put_object(
        Bucket=bucket, Key=f"docker/registry/v2/blobs/sha256/{ONE[:2]}/{ONE}/data", Body=b""
    )
    _candidates, check_kb = cli_check(check, state)
    delete_kb = run_child(ours_cmd("delete", delete, state)).max_rss_kb
    return check_kb, delete_kb


def trash_compare(weed: SeaweedFS, args: argparse.Namespace, config: Path, state: Path) -> None:
    """Delete rate without and with trash (copy then batched delete, per key), alternating,
    the bucket made whole again before each delete."""
    rates: dict[str, list[float]] = {"plain": [], "trash": []}
    for _ in range(args.repeats):
        for name, extra in (("plain", ()), ("trash", ("--trash", "7d"))):
            (weed_dir(args) / f"{bucket_for(args.blobs)}.complete").unlink(missing_ok=True)
            fill_bucket(weed, args)
            before = os.getloadavg()
            result = delete_run(config, state, *extra)
            rates[name].append(result["blobs_per_s"] or 0)
            emit(
                measure=f"delete_{name}",
                loadavg_before=[round(x, 2) for x in before],
                loadavg_after=[round(x, 2) for x in os.getloadavg()],
                **result,
            )
    plain, trash = median(rates["plain"]), median(rates["trash"])
    emit(
        measure="delete_trash_ratio",
        plain_blobs_per_s_median=plain,
        trash_blobs_per_s_median=trash,
        trash_over_plain=round(trash / plain, 2) if plain else None,
    )
    (weed_dir(args) / f"{bucket_for(args.blobs)}.complete").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=50_000, help="store size (bench/run.py's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pruned-bench"))
    parser.add_argument("--no-delete", action="store_true", help="measure the check only")
    parser.add_argument(
        "--trash-compare",
        action="store_true",
        help="only the delete, without and with --trash 7d, side by side (--repeats rounds)",
    )
    parser.add_argument(
        "--ours-only",
        action="store_true",
        help="only the CLI check: time and peak RSS (a million blobs: the peer takes ~40 min)",
    )
    parser.add_argument(
        "--upload-only",
        action="store_true",
        help="make the bucket complete and stop (e.g. at nice 19, before a measured run)",
    )
    parser.add_argument(
        "--untagged",
        action="store_true",
        help="tags pushed 5 times; an untagged check against garbage-collect --delete-untagged",
    )
    parser.add_argument(
        "--repos",
        type=int,
        help="repositories in the store (default bench/run.py's, ~7 tags each with --untagged)",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.work.mkdir(parents=True, exist_ok=True)
    installed_bytecode()

    weed, info = prepare(args)
    bucket = info["bucket"]
    state = args.work / "state-s3"
    daemon: Daemon | None = None
    try:
        emit(store=info, loadavg=[round(x, 2) for x in os.getloadavg()])
        if args.upload_only:
            return
        config = registry_config(weed, bucket, args.work / f"{bucket}.yml", read_only=False)
        read_only = registry_config(weed, bucket, args.work / f"{bucket}-ro.yml", read_only=True)
        if args.trash_compare:
            trash_compare(weed, args, read_only, state)
            return
        api_state = args.work / "state-s3-api"
        daemon = Daemon(config, api_state, "--log-level", "warning", "--grace", "0").start()

        weed_pid = weed.process.pid if weed.process is not None else None
        api_pid = daemon.proc.pid if daemon.proc is not None else None
        tools: dict[str, Callable[[], Any]] = {
            "floor": lambda: floor(weed, bucket),
            "ours_cli": lambda: cli_check(config, state, args.untagged),
            "ours_api": lambda: api_check(daemon, args.untagged),
            "ours_engine": lambda: asyncio.run(engine_check(config, args.untagged)),
            "peer": lambda: peer(config, args.untagged),
        }
        if args.ours_only:
            tools = {"ours_cli": tools["ours_cli"]}
        runs: dict[str, list[float]] = {name: [] for name in tools}
        cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in tools}
        answers: dict[str, Any] = {}
        phases: list[dict[str, float]] = []
        rss: dict[str, list[int]] = {name: [] for name in ("ours_cli", "peer") if name in tools}
        for _ in range(args.repeats):
            # round robin: load from other work on the machine falls on every contender alike
            for name, tool in tools.items():
                daemon_pid = api_pid if name == "ours_api" else None
                seconds, client_cpu, store_cpu, answers[name] = metered(tool, daemon_pid, weed_pid)
                runs[name].append(seconds)
                cpu[name].append((client_cpu, store_cpu))
            if "ours_engine" in answers:
                answers["ours_engine"], phase = answers["ours_engine"]
                phases.append(phase)
            for name in rss:
                answers[name], peak_kb = answers[name]
                rss[name].append(peak_kb)
            emit(
                round={k: round(v[-1], 3) for k, v in runs.items()},
                cpu={k: [round(x, 2) for x in v[-1]] for k, v in cpu.items()},
                phases=phases[-1] if phases else {},
                loadavg=[round(x, 2) for x in os.getloadavg()],
            )
        ours_rss = statistics.median(rss["ours_cli"]) * 1024

        def emit_peak_rss(**more: Any) -> None:
            emit(
                measure="peak_rss",
                blobs=info["blobs"],
                ours_cli_mb=round(ours_rss / 2**20, 1),
                ours_bytes_per_blob=round(ours_rss / info["blobs"], 1),
                **more,
            )

        if args.ours_only:
            base_kb, base_delete_kb = empty_bucket_rss(weed, args, state)
            emit_peak_rss(
                candidates=answers["ours_cli"],
                seconds=[round(v, 2) for v in runs["ours_cli"]],
                client_cpu_seconds=[round(c, 2) for c, _s in cpu["ours_cli"]],
                store_cpu_seconds=[round(s, 2) for _c, s in cpu["ours_cli"]],
                empty_bucket_mb=round(base_kb / 1024, 1),
                bytes_per_blob_above_empty=round((ours_rss - base_kb * 1024) / info["blobs"], 1),
                loadavg=[round(x, 2) for x in os.getloadavg()],
            )
            if not args.no_delete:
                # the bucket changes from here on: the next run lists it and uploads what went
                (weed_dir(args) / f"{bucket}.complete").unlink(missing_ok=True)
                weed_cpu = _cpu_of(weed_pid)
                result = delete_run(read_only, state)
                result["store_cpu_seconds"] = round(_cpu_of(weed_pid) - weed_cpu, 2)
                peak = result.pop("peak_rss_kb") * 1024
                emit(
                    measure="delete_peak_rss",
                    blobs=info["blobs"],
                    peak_rss_mb=round(peak / 2**20, 1),
                    bytes_per_blob=round(peak / info["blobs"], 1),
                    empty_bucket_mb=round(base_delete_kb / 1024, 1),
                    bytes_per_blob_above_empty=round(
                        (peak - base_delete_kb * 1024) / info["blobs"], 1
                    ),
                    loadavg=[round(x, 2) for x in os.getloadavg()],
                    **result,
                )
            return

        theirs = answers["peer"]
        candidates = len(theirs)
        same = answers["ours_engine"] == theirs and answers["ours_api"] == theirs
        if not same or answers["ours_cli"] != candidates:
            raise SystemExit(
                f"answers differ: peer {candidates}, engine {len(answers['ours_engine'])}, "
                f"api {len(answers['ours_api'])}, cli {answers['ours_cli']}, "
                f"only ours {len(answers['ours_engine'] - theirs)}, "
                f"only peer {len(theirs - answers['ours_engine'])}"
            )
        work: dict[str, float] = {}
        for name, values in runs.items():
            client = median([c for c, _s in cpu[name]])
            weed_cpu = median([s for _c, s in cpu[name]])
            work[name] = client + weed_cpu
            emit(
                measure=name,
                seconds=[round(v, 3) for v in values],
                median=median(values),
                client_cpu_median=client,
                store_cpu_median=weed_cpu,
            )
        emit(
            measure="engine_phases_median",
            **{k: median([p.get(k, 0.0) for p in phases]) for k in phases[0]},
        )
        emit_peak_rss(peer_mb=round(statistics.median(rss["peer"]) / 1024, 1))
        peer_s = median(runs["peer"])
        ratio = {name: peer_s / median(runs[name]) for name in ("ours_cli", "ours_api")}
        emit(
            ratios={
                "candidates": candidates,
                "same_candidates": same,
                "listed_keys": answers["floor"],
                "peer_over_ours_cli": round(ratio["ours_cli"], 1),
                "peer_over_ours_api": round(ratio["ours_api"], 1),
                "peer_over_ours_engine": round(peer_s / median(runs["ours_engine"]), 1),
                "ours_cli_over_floor": round(median(runs["ours_cli"]) / median(runs["floor"]), 2),
                "ours_api_over_floor": round(median(runs["ours_api"]) / median(runs["floor"]), 2),
                # CPU seconds (client + SeaweedFS) the peer needs for each one of ours
                "peer_over_ours_cli_cpu": round(work["peer"] / work["ours_cli"], 1),
                "peer_over_ours_api_cpu": round(work["peer"] / work["ours_api"], 1),
                "goal_ratio": GOAL_RATIO,
                "check_goal_met": min(ratio.values()) >= GOAL_RATIO,
            }
        )
        daemon.stop()
        daemon = None

        if not args.no_delete:
            if candidates < 10_000:
                emit(warning=f"only {candidates} orphans; the goal is measured on 10,000")
            # the bucket changes from here on: the next run lists it and uploads what went
            (weed_dir(args) / f"{bucket}.complete").unlink(missing_ok=True)
            result = delete_run(read_only, state)
            result["goal_blobs_per_s"] = GOAL_DELETE_RATE
            result["delete_goal_met"] = (result["blobs_per_s"] or 0) >= GOAL_DELETE_RATE
            emit(measure="delete", **result)
            left, _phases = asyncio.run(engine_check(config))
            emit(measure="after_delete", candidates_left=len(left))
        emit(loadavg_end=[round(x, 2) for x in os.getloadavg()])
    finally:
        if daemon is not None:
            daemon.stop()
        weed.stop()


if __name__ == "__main__":
    main()
