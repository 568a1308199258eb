"""The engine on a simulated store (bench/simstore.py): peak RSS per blob and time, any size.

    python bench/sim_check.py rss --blobs 1000000 [--blobs 10000000] [--mode check|delete]
                                  [--usage on|off] [--profile]
    python bench/sim_check.py run --blobs N [--mode ...] [--usage ...] [--profile]

``run`` is one run of the engine in this process (the storage source, RunOptions grace=0,
the registry taken as read-only for a delete), on the store ``plan_for`` sizes as
bench/run.py's stores: one JSON line with its seconds, phases and counts. ``rss`` runs
``run`` as a child, for an empty store and for each size, and reports the peak RSS of the
process tree (bench/run.py's ``run_child``) and the bytes per blob above the empty store's.
``--profile`` adds tracemalloc's top allocation sites, snapshot at the start of the sweep
and of the delete phase (tracemalloc slows the run and adds its own memory: RSS figures come
from runs without it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import repos_for, run_child  # noqa: E402
from bench.simstore import SimStorage  # noqa: E402
from bench.synth import plan_for  # noqa: E402
from daemon import logs, verify  # noqa: E402
from daemon.progress import Progress  # noqa: E402
from daemon.prune import CHECK, DELETE, Candidate, Engine, RunOptions  # noqa: E402
from daemon.sources.storage import StorageSource  # noqa: E402

#: seconds between a run's progress lines on stderr, and what they say
PROGRESS_EVERY = 60.0
PROGRESS_FIELDS = ("phase", "repositories", "manifests", "manifests_total", "shards_done")
PROGRESS_FIELDS += ("candidates", "deleted")


def emit(**fields: Any) -> None:
    fields.setdefault("load", [round(x, 2) for x in os.getloadavg()])
    print(json.dumps(fields), flush=True)


def _rss_mb(field: str = "VmRSS:") -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


def _top(snapshot: tracemalloc.Snapshot, n: int = 12) -> list[str]:
    stats = snapshot.statistics("lineno")
    total = sum(s.size for s in stats)
    out = [f"traced {total / 2**20:.1f} MiB"]
    for stat in stats[:n]:
        frame = stat.traceback[0]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        out.append(f"{stat.size / 2**20:7.1f} MiB {stat.count:>9} blocks  {where}")
    return out


class UnverifiedEngine(Engine):
    """The engine without the verification after a delete (to tell its memory apart)."""

    async def verify_kept(self, inventory: Any, marks: Any, candidates: Any) -> None:
        return None


class ProfiledEngine(Engine):
    """The engine, with tracemalloc snapshots where the run holds the most."""

    profile: dict[str, list[str]]

    async def sweep(self, marks: Any) -> Any:
        self.profile["sweep-start"] = _top(tracemalloc.take_snapshot())
        return await super().sweep(marks)

    async def delete(self, inventory: Any, marks: Any, candidates: Any) -> None:
        self.profile["delete-start"] = _top(tracemalloc.take_snapshot())
        await super().delete(inventory, marks, candidates)

    async def verify_kept(self, inventory: Any, marks: Any, candidates: Any) -> None:
        # the verification holds the most when it judges: every manifest's facts, every size
        judge = verify.StoreVerifier._judge

        def snapshot_then_judge(verifier: Any, *args: Any) -> None:
            self.profile["verify-judge"] = _top(tracemalloc.take_snapshot())
            judge(verifier, *args)

        verify.StoreVerifier._judge = snapshot_then_judge  # type: ignore[method-assign]
        try:
            await super().verify_kept(inventory, marks, candidates)
        finally:
            verify.StoreVerifier._judge = judge  # type: ignore[method-assign]


async def run_once(
    blobs: int, mode: str, usage: bool, profile: bool, verify: bool = True
) -> dict[str, Any]:
    if blobs:
        plan = plan_for(Path("/sim"), blobs, repos_for(blobs), 5, 0.1, 1)
    else:  # the empty store: no repositories, no blobs
        plan = plan_for(Path("/sim"), 1, 1, 5, 0.0, 1).__class__("/sim", 0, 0, 5, 0, 0, 1)
    storage = SimStorage(plan)
    log = logs.make_logger("warning", "json", sys.stderr)
    found = [0, 0]

    def count(candidate: Candidate) -> None:
        found[0] += 1
        found[1] += candidate.size

    progress = Progress()
    options = RunOptions(mode=mode, grace=0, usage=usage, registry_read_only=True)
    engine_type = ProfiledEngine if profile else Engine if verify else UnverifiedEngine
    engine = engine_type(
        storage, StorageSource(16, log), options, progress, on_candidate=count, log=log
    )
    engine.profile = {}  # type: ignore[attr-defined]
    if profile:
        tracemalloc.start()
    phases: dict[str, float] = {}
    peaks: dict[str, float] = {}  # this process's RSS, the highest seen in each phase (MB)
    #: the kernel's high-water mark (VmHWM) when each phase was last seen: the sampler runs
    #: only when the event loop is free, so a spike inside blocking work shows only here
    hwm: dict[str, float] = {}
    current = [progress.phase, time.perf_counter()]

    def note() -> None:
        now = time.perf_counter()
        peaks[progress.phase] = max(peaks.get(progress.phase, 0.0), _rss_mb())
        if progress.phase != current[0]:
            hwm[current[0]] = _rss_mb("VmHWM:")  # reached by the end of that phase
            phases[current[0]] = phases.get(current[0], 0.0) + now - current[1]
            current[:] = [progress.phase, now]

    async def watch() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            note()
            if time.perf_counter() - last >= PROGRESS_EVERY:
                # a line to stderr now and then: how far a long run got if it must be stopped
                last = time.perf_counter()
                used = resource.getrusage(resource.RUSAGE_SELF)
                print(
                    json.dumps(
                        {
                            "progress_s": round(last - started, 1),
                            "cpu_seconds": round(used.ru_utime + used.ru_stime, 1),
                            "rss_mb": round(_rss_mb(), 1),
                            **{k: getattr(progress, k) for k in PROGRESS_FIELDS},
                        }
                    ),
                    file=sys.stderr,
                    flush=True,
                )

    started = time.perf_counter()
    watcher = asyncio.create_task(watch())
    try:
        summary = await engine.run()
    finally:
        watcher.cancel()
    seconds = time.perf_counter() - started
    used = resource.getrusage(resource.RUSAGE_SELF)
    note()
    result: dict[str, Any] = {
        "blobs": storage.shape.blobs,
        "mode": mode,
        "usage": usage,
        "verify": verify,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(used.ru_utime + used.ru_stime, 2),
        "phases": {k: round(v, 2) for k, v in phases.items() if k not in ("starting", "done")},
        "rss_mb_by_phase": {k: round(v, 1) for k, v in peaks.items()},
        "hwm_mb_by_phase_end": {k: round(v, 1) for k, v in hwm.items()},
        "candidates": found[0],
        "summary_blobs": summary.blobs,
        "left": storage.alive_blobs(),
    }
    if engine.verification is not None:
        result["verification"] = engine.verification.document()
    if engine.usage is not None:
        result["usage_repositories"] = engine.usage["totals"]["repositories"]
    if profile:
        result["profile"] = engine.profile  # type: ignore[attr-defined]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "rss"))
    parser.add_argument("--blobs", type=int, action="append")
    parser.add_argument("--mode", choices=(CHECK, DELETE), default=CHECK)
    parser.add_argument("--usage", choices=("on", "off"), default="off")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-verify", action="store_true", help="a delete without verify")
    args = parser.parse_args()
    sizes = args.blobs or [1_000_000]
    if args.command == "run":
        result = asyncio.run(
            run_once(sizes[0], args.mode, args.usage == "on", args.profile, not args.no_verify)
        )
        print(json.dumps(result), flush=True)
        return 0

    def child(blobs: int) -> tuple[dict[str, Any], int]:
        cmd = [sys.executable, __file__, "run", "--blobs", str(blobs), "--mode", args.mode]
        cmd += ["--usage", args.usage] + (["--profile"] if args.profile else [])
        cmd += ["--no-verify"] if args.no_verify else []
        done = run_child(cmd)
        line = done.stdout.decode().strip().splitlines()[-1]
        return json.loads(line), done.max_rss_kb * 1024

    _empty, base = child(0)
    for blobs in sizes:
        result, rss = child(blobs)
        emit(
            bench="sim-rss",
            **{k: v for k, v in result.items() if k != "profile"},
            peak_rss_mb=round(rss / 2**20, 1),
            empty_store_rss_mb=round(base / 2**20, 1),
            bytes_per_blob_above_empty=round((rss - base) / result["blobs"], 1),
        )
        if "profile" in result:
            for where, lines in result["profile"].items():
                print(f"# {where}", *lines, sep="\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
