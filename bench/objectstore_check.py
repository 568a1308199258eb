"""Azure (Azurite) and GCS (fake-gcs-server) benchmarks: check time, delete rate, peak RSS.

    python bench/objectstore_check.py [--blobs 50000] [--repeats 3] [--drivers azure,gcs]

No collector runs against these emulators, so the reference is the floor, measured in the
same run through the same emulator: one sequential flat listing of the whole container or
bucket (the driver's own page call, one page after the other). Goals: a check at or under
0.5x that floor, deletes at 1,000 blobs/s or more, 200 B/blob of peak RSS at most. The store
is bench/s3_check.py's (bench/run.py's plan, some images deleted through the API), uploaded
through the driver. The emulators' own CPU is reported with each figure. JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.s3_check import cli_check, delete_run, emit, median, metered, store_objects  # noqa: E402
from daemon.storage.objectstore import ObjectStore  # noqa: E402
from tests.harness.azurite import Azurite  # noqa: E402
from tests.harness.emulator import Emulator  # noqa: E402
from tests.harness.fakegcs import FakeGCS  # noqa: E402

GOAL_RATIO = 0.5
GOAL_DELETE_RATE = 1000.0
GOAL_BYTES_PER_BLOB = 200.0
EMULATORS: dict[str, type[Emulator]] = {"azure": Azurite, "gcs": FakeGCS}


def driver(emulator: Emulator, name: str) -> ObjectStore:
    from daemon.storage import open_storage

    storage = open_storage(emulator.settings(name), 32)  # type: ignore[attr-defined]
    assert isinstance(storage, ObjectStore)
    return storage


async def upload(storage: ObjectStore, objects: dict[str, bytes], workers: int = 32) -> None:
    """Every object through the driver, ``workers`` at a time."""
    items = iter(objects.items())

    async def worker() -> None:
        for key, data in items:
            await storage.write(key.removeprefix("docker/registry/v2/"), data)

    try:
        await asyncio.gather(*(worker() for _ in range(workers)))
    finally:
        await storage.close()


async def flat_listing(storage: ObjectStore) -> int:
    """The floor: one sequential flat listing of the whole container or bucket."""
    count = 0
    try:
        async for page in storage._pages(""):
            count += len(page.objects)
    finally:
        await storage.close()
    return count


def config(emulator: Emulator, name: str, path: Path, read_only: bool) -> Path:
    doc = emulator.registry_config(name)  # type: ignore[attr-defined]
    doc["storage"]["delete"] = {"enabled": True}
    if read_only:
        doc["storage"]["maintenance"] = {"readonly": {"enabled": True}}
    path.write_text(yaml.safe_dump(doc))
    return path


def bench(kind: str, args: argparse.Namespace, objects: dict[str, bytes], counts: dict) -> None:
    with EMULATORS[kind]() as emulator:
        if isinstance(emulator, FakeGCS):
            os.environ["STORAGE_EMULATOR_HOST"] = emulator.url  # the CLI children read it
        name = emulator.create(f"bench-{args.blobs}")
        started = time.monotonic()
        asyncio.run(upload(driver(emulator, name), objects))
        emit(
            driver=kind,
            measure="upload",
            objects=len(objects),
            seconds=round(time.monotonic() - started, 1),
        )
        work = args.work / kind
        work.mkdir(parents=True, exist_ok=True)
        check_config = config(emulator, name, work / "check.yml", read_only=False)
        pid = emulator.process.pid if emulator.process is not None else None
        runs: dict[str, list[tuple[float, float, float]]] = {"floor": [], "check": []}
        rss: list[int] = []
        candidates = 0
        for _ in range(args.repeats):
            seconds, client, store, listed = metered(
                lambda: asyncio.run(flat_listing(driver(emulator, name))), None, pid
            )
            runs["floor"].append((seconds, client, store))
            seconds, client, store, (candidates, peak_kb) = metered(
                lambda: cli_check(check_config, work / "state"), None, pid
            )
            runs["check"].append((seconds, client, store))
            rss.append(peak_kb)
            emit(
                driver=kind,
                floor=round(runs["floor"][-1][0], 2),
                check=round(runs["check"][-1][0], 2),
                listed=listed,
                candidates=candidates,
            )
        figures = {
            name: {
                "median_s": median([s for s, _c, _e in values]),
                "client_cpu_s": median([c for _s, c, _e in values]),
                "emulator_cpu_s": median([e for _s, _c, e in values]),
            }
            for name, values in runs.items()
        }
        ratio = figures["check"]["median_s"] / figures["floor"]["median_s"]
        peak = statistics.median(rss) * 1024
        emit(
            driver=kind,
            measure="check",
            blobs=counts["blobs"],
            candidates=candidates,
            **{f"{k}_{m}": v for k, f in figures.items() for m, v in f.items()},
            ratio_to_floor=round(ratio, 3),
            goal_ratio=GOAL_RATIO,
            peak_rss_mb=round(peak / 2**20, 1),
            bytes_per_blob=round(peak / counts["blobs"], 1),
            goal_bytes_per_blob=GOAL_BYTES_PER_BLOB,
        )
        if args.no_delete:
            return
        delete_config = config(emulator, name, work / "delete.yml", read_only=True)
        seconds, client, store, deleted = metered(
            lambda: delete_run(delete_config, work / "state"), None, pid
        )
        emit(
            driver=kind,
            measure="delete",
            **deleted,
            client_cpu_s=round(client, 2),
            emulator_cpu_s=round(store, 2),
            goal_blobs_per_s=GOAL_DELETE_RATE,
        )
        os.environ.pop("STORAGE_EMULATOR_HOST", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--drivers", default="azure,gcs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pruned-bench-objectstores"))
    parser.add_argument("--no-delete", action="store_true")
    args = parser.parse_args()
    objects, counts = store_objects(args.blobs)
    emit(store=counts, objects=len(objects), loadavg=[round(x, 2) for x in os.getloadavg()])
    for kind in args.drivers.split(","):
        bench(kind, args, objects, counts)


if __name__ == "__main__":
    main()
