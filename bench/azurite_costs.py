"""Azurite's own CPU per request, by kind, as the container grows (bench/README.md).

    python bench/azurite_costs.py

Puts, shard listings, a page of 5,000, GETs and a Blob Batch of 200 deletes, at 500, 2,000
and 8,000 objects; Azurite's CPU read from /proc. JSON lines on stdout.
"""

import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from azure.storage.blob.aio import BlobServiceClient

from daemon.storage.azure import token_boundary
from tests.harness.azurite import ACCOUNT, KEY, Azurite


def cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid``."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


async def main(az: Azurite) -> None:
    svc = BlobServiceClient(az.url, credential={"account_name": ACCOUNT, "account_key": KEY})
    c = svc.get_container_client("perreq")
    await c.create_container()
    assert az.process is not None
    pid = az.process.pid
    have = 0
    sem = asyncio.Semaphore(32)

    async def put(k: str) -> None:
        async with sem:
            await c.upload_blob(k, b"x" * 100, overwrite=True)

    for target in (500, 2000, 8000):
        t = time.perf_counter()
        c0 = cpu(pid)
        await asyncio.gather(
            *(put(f"blobs/sha256/{i % 256:02x}/{i:064x}/data") for i in range(have, target))
        )
        up = (cpu(pid) - c0) / (target - have)
        upw = (time.perf_counter() - t) / (target - have)
        have = target
        out = {
            "objects": have,
            "put_cpu_ms": round(up * 1000, 2),
            "put_wall_ms": round(upw * 1000, 2),
        }
        # 20 shard listings (each ~1/256 of the objects)
        c0 = cpu(pid)
        t = time.perf_counter()
        for s in range(20):
            [b async for b in c.list_blobs(name_starts_with=f"blobs/sha256/{s:02x}/")]
        out["shard_list_cpu_ms"] = round((cpu(pid) - c0) / 20 * 1000, 1)
        out["shard_list_wall_ms"] = round((time.perf_counter() - t) / 20 * 1000, 1)
        # one flat listing page of 5000
        c0 = cpu(pid)
        t = time.perf_counter()
        pages = c.list_blobs(results_per_page=5000).by_page()
        first = [b async for b in await pages.__anext__()]
        out["page5000_cpu_ms"] = round((cpu(pid) - c0) * 1000, 1)
        out["page5000_wall_ms"] = round((time.perf_counter() - t) * 1000, 1)
        out["page_items"] = len(first)
        # 50 GETs
        c0 = cpu(pid)
        t = time.perf_counter()
        for i in range(50):
            await (await c.download_blob(f"blobs/sha256/{i % 256:02x}/{i:064x}/data")).readall()
        out["get_cpu_ms"] = round((cpu(pid) - c0) / 50 * 1000, 2)
        out["get_wall_ms"] = round((time.perf_counter() - t) / 50 * 1000, 2)
        # a batch of 200 deletes (re-put after)
        keys = [f"blobs/sha256/{i % 256:02x}/{i:064x}/data" for i in range(have - 200, have)]
        c0 = cpu(pid)
        t = time.perf_counter()
        ans = await c.delete_blobs(
            *keys, raise_on_any_failure=False, raw_request_hook=token_boundary
        )
        sts = [a.status_code async for a in ans]
        out["batch200_cpu_ms"] = round((cpu(pid) - c0) * 1000, 1)
        out["batch200_wall_ms"] = round((time.perf_counter() - t) * 1000, 1)
        out["batch_statuses"] = sorted(set(sts))
        await asyncio.gather(*(put(k) for k in keys))
        out["load"] = round(os.getloadavg()[0], 1)
        print(json.dumps(out), flush=True)
    await svc.close()


if __name__ == "__main__":
    az = Azurite().start()
    try:
        asyncio.run(main(az))
    finally:
        az.stop()
