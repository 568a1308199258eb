"""Status latency while a check walks a large store: p50/p99 of GET /runs/latest.

    python bench/status_latency.py [--blobs 50000] [--store DIR]

Generates the store with bench/synth.py unless --store names an existing one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synth import generate, plan_for  # noqa: E402
from tests.harness.daemon import Daemon  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=50_000)
    parser.add_argument("--store", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pruned-bench-"))
    store = args.store
    if store is None:
        store = work / "store"
        print(json.dumps({"generated": generate(plan_for(store, args.blobs, 200, 5, 0.1, 1))}))
    config = work / "config.yml"
    config.write_text(f"storage:\n  filesystem:\n    rootdirectory: {store}\n")
    daemon = Daemon(config, work / "state", "--log-level", "warning").start()
    latencies: list[float] = []
    durations: list[float] = []
    try:
        for _ in range(args.runs):
            _status, _h, body = daemon.request("POST", "/prune?mode=check")
            if "id" not in json.loads(body):
                raise SystemExit(f"cannot start a run: {body.decode()}")
            run = json.loads(body)["id"]
            started = time.monotonic()
            while True:
                t0 = time.perf_counter()
                with urllib.request.urlopen(f"{daemon.url}/runs/latest", timeout=10) as resp:
                    doc = json.loads(resp.read())
                if doc["id"] == run and doc["state"] != "running":
                    break
                latencies.append((time.perf_counter() - t0) * 1000)
                time.sleep(0.01)
            durations.append(time.monotonic() - started)
    finally:
        daemon.stop()
    print(
        json.dumps(
            {
                "blobs": args.blobs,
                "status_requests_during_runs": len(latencies),
                "p50_ms": round(statistics.median(latencies), 2),
                "p99_ms": round(percentile(latencies, 0.99), 2),
                "max_ms": round(max(latencies), 2),
                "check_seconds": [round(d, 2) for d in durations],
                "goal_p99_ms": 100,
            }
        )
    )


if __name__ == "__main__":
    main()
