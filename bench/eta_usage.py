"""How good the ETA is, and what per-repository usage costs, on the bench stores.

    python bench/eta_usage.py eta [--blobs 500000] [--mode check|delete] [--runs 2] [--s3]
    python bench/eta_usage.py rss [--blobs 1000000]

``eta``: runs through the API on the kept store (bench/run.py's, under --work), polling the
run every 50 ms; at the first look where ``fraction`` >= 0.5 it compares ``eta_seconds``
with the time the run really took from there (a ratio of 1.0 is exact; the goal is within
2x). Consecutive runs share a daemon, so the second knows the first's repository count.
A delete runs on a hard-link copy with a read-only config. With ``--s3`` the store is
bench/s3_check.py's bucket on a local SeaweedFS (its set-up and upload), and a delete's
bucket is made whole again before the next run. ``rss``: peak RSS of one warm
CLI check with ``--usage`` and one without (bench/run.py's measure: the process tree).
Each figure is one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    GOAL_BYTES_PER_BLOB,
    _hardlink_copy,
    emit,
    ours_cmd,
    registry_config,
    run_child,
    store,
)
from bench.s3_check import (  # noqa: E402
    bucket_for,
    fill_bucket,
    prepare,
    weed_dir,
)
from bench.s3_check import registry_config as s3_registry_config  # noqa: E402
from tests.harness.daemon import Daemon  # noqa: E402

#: the harness takes a daemon as ready only once it logged "listening", an info line
LOG_LEVEL = ("--log-level", "info")


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def follow(daemon: Daemon, mode: str) -> dict[str, Any]:
    """One run: samples of (seconds since start, fraction, eta), then the ETA at 50%."""
    status, _h, body = daemon.request("POST", f"/prune?mode={mode}&grace=0")
    if status != 202:
        raise RuntimeError(f"{mode} refused: {status} {body[:300]!r}")
    run = json.loads(body)["id"]
    started = time.perf_counter()
    samples: list[tuple[float, float, float | None, str]] = []
    while True:
        doc = _get(f"{daemon.url}/runs/{run}")
        now = time.perf_counter() - started
        if doc["state"] != "running":
            break
        progress = doc["progress"]
        samples.append((now, progress["fraction"], progress["eta_seconds"], doc["phase"]))
        time.sleep(0.05)
    total = time.perf_counter() - started
    if doc["state"] != "succeeded":
        raise RuntimeError(f"{mode} run {doc['state']}: {doc.get('error')}")
    half = next((s for s in samples if s[1] >= 0.5 and s[2] is not None), None)
    first_eta = next((s for s in samples if s[2] is not None), None)
    out: dict[str, Any] = {"run_s": round(total, 2), "samples": len(samples)}
    if half is not None:
        at, fraction, eta, phase = half
        left = total - at
        out.update(
            at_s=round(at, 2),
            fraction=fraction,
            phase=phase,
            eta_s=eta,
            real_left_s=round(left, 2),
            ratio=round(eta / left, 2) if left > 0 else None,
        )
    if first_eta is not None:
        out["first_eta_at_s"] = round(first_eta[0], 2)
    # where each phase started, as a share of the run: what the weights try to match
    phases: dict[str, float] = {}
    for at, _f, _e, phase in samples:
        phases.setdefault(phase, round(at / total, 3))
    out["phase_starts"] = phases
    return out


def bench_eta(work: Path, blobs: int, mode: str, runs: int) -> None:
    root, counts = store(work, blobs)
    copy = None
    if mode == "delete":
        copy = work / f"eta-delete-{blobs}"
        _hardlink_copy(root, copy)
        root = copy
    config = registry_config(work, root, read_only=mode == "delete")
    state = work / f"state-eta-{blobs}-{mode}"
    shutil.rmtree(state, ignore_errors=True)
    daemon = Daemon(config, state, *LOG_LEVEL).start()
    try:
        for i in range(runs):
            if mode == "delete" and i:
                daemon.stop()
                assert copy is not None
                _hardlink_copy(work / f"store-{blobs}", copy)  # orphans back for the next
                daemon = Daemon(config, state, *LOG_LEVEL).start()
            found = follow(daemon, mode)
            emit(
                bench="eta",
                driver="filesystem",
                mode=mode,
                blobs=counts["blobs"],
                run=i + 1,
                **found,
            )
    finally:
        daemon.stop()
        if copy is not None:
            shutil.rmtree(copy, ignore_errors=True)


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def bench_eta_s3(work: Path, blobs: int, mode: str, runs: int) -> None:
    """``bench_eta`` on bench/s3_check.py's bucket, SeaweedFS as S3."""
    args = argparse.Namespace(work=work, blobs=blobs, untagged=False)
    weed, info = prepare(args)
    bucket = info["bucket"]
    complete = weed_dir(args) / f"{bucket_for(blobs)}.complete"
    config = s3_registry_config(
        weed, bucket, work / f"{bucket}-eta-{mode}.yml", read_only=mode == "delete"
    )
    state = work / f"state-eta-s3-{blobs}-{mode}"
    shutil.rmtree(state, ignore_errors=True)
    daemon: Daemon | None = None
    try:
        emit(store=info, loadavg=_loadavg())
        daemon = Daemon(config, state, *LOG_LEVEL).start()
        for i in range(runs):
            if mode == "delete":
                if i:
                    daemon.stop()
                    fill_bucket(weed, args)  # orphans back for the next
                    daemon = Daemon(config, state, *LOG_LEVEL).start()
                # the bucket changes from here on: the next set-up lists it again
                complete.unlink(missing_ok=True)
            before = _loadavg()
            found = follow(daemon, mode)
            emit(
                bench="eta",
                driver="s3",
                mode=mode,
                blobs=info["blobs"],
                run=i + 1,
                loadavg_before=before,
                loadavg_after=_loadavg(),
                **found,
            )
    finally:
        if daemon is not None:
            daemon.stop()
        weed.stop()


def bench_rss(work: Path, blobs: int) -> None:
    root, counts = store(work, blobs)
    config = registry_config(work, root)
    state = work / "state"
    # both warm: usage stats every in-use blob's data file, which a plain check never opens
    run_child(ours_cmd("check", config, state, "--usage"))
    plain = run_child(ours_cmd("check", config, state))
    usage = run_child(ours_cmd("check", config, state, "--usage"))
    total = counts["blobs"]
    emit(
        bench="usage-rss",
        driver="filesystem",
        blobs=total,
        check_rss_mb=round(plain.max_rss_kb / 1024, 1),
        check_usage_rss_mb=round(usage.max_rss_kb / 1024, 1),
        bytes_per_blob=round(plain.max_rss_kb * 1024 / total, 1),
        bytes_per_blob_usage=round(usage.max_rss_kb * 1024 / total, 1),
        usage_cost_bytes_per_blob=round((usage.max_rss_kb - plain.max_rss_kb) * 1024 / total, 1),
        check_s=round(plain.seconds, 2),
        check_usage_s=round(usage.seconds, 2),
        goal_bytes_per_blob=GOAL_BYTES_PER_BLOB,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("eta", "rss"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/pruned-bench"))
    parser.add_argument("--blobs", type=int, action="append")
    parser.add_argument("--mode", choices=("check", "delete"), default="check")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--s3", action="store_true", help="eta on SeaweedFS (bench/s3_check.py)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    for blobs in args.blobs or [500_000]:
        if args.command == "eta":
            eta = bench_eta_s3 if args.s3 else bench_eta
            eta(args.work, blobs, args.mode, args.runs)
        else:
            bench_rss(args.work, blobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
