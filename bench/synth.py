"""Synthetic registry store: real digests, real schema2 manifests, distribution's layout.

    python bench/synth.py DIR --blobs 50000 [--repos 200] [--layers 5] [--orphans 0.1]

Writes ``DIR/docker/registry/v2/...`` so that ``docker-registry garbage-collect`` reads it.
All files get an mtime two days old, so a grace period does not hide the orphans.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
CONFIG = "application/vnd.docker.container.image.v1+json"
OLD = time.time() - 2 * 86400


@dataclass(frozen=True)
class Plan:
    root: str
    repos: int
    manifests_per_repo: int
    layers: int
    shared: int
    orphans: int
    seed: int


def _write(path: str, data: bytes, fresh_dir: bool = False) -> None:
    """Write one file with an old mtime; ``fresh_dir``: its directory is new, parent exists."""
    # the store is kernel-bound (mkdir/creat): one mkdir where the parent is known to exist
    # saves makedirs' walk up and a failed open per file
    if fresh_dir:
        try:
            os.mkdir(os.path.dirname(path))
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.utime(fd, (OLD, OLD))
    os.close(fd)


def _blob(v2: str, data: bytes) -> str:
    hexd = hashlib.sha256(data).hexdigest()
    _write(f"{v2}/blobs/sha256/{hexd[:2]}/{hexd}/data", data, fresh_dir=True)
    return hexd


def _link(path: str, hexd: str) -> None:
    _write(path, f"sha256:{hexd}".encode(), fresh_dir=True)


def _repo_name(i: int) -> str:
    # a third of the names have three components, like OpenShift's and distribution's users
    return f"team{i % 7}/proj{i % 3}/app{i}" if i % 3 == 0 else f"ns{i % 11}/app{i}"


def _shared_layer(plan: Plan, i: int) -> bytes:
    return f"shared-{plan.seed}-{i}".encode() * 8


def build_repos(plan: Plan, first: int, last: int) -> tuple[int, int]:
    """Repositories [first, last): their manifests, configs and layers; (blobs, manifests)."""
    v2 = f"{plan.root}/docker/registry/v2"
    rng = random.Random(plan.seed * 1_000_003 + first)
    shared = [hashlib.sha256(_shared_layer(plan, i)).hexdigest() for i in range(plan.shared)]
    blobs = manifests = 0
    for r in range(first, last):
        name = _repo_name(r)
        repo = f"{v2}/repositories/{name}"
        for m in range(plan.manifests_per_repo):
            layers = []
            for _ in range(plan.layers - 1):
                data = rng.randbytes(rng.randint(64, 256))
                layers.append((_blob(v2, data), len(data)))
                blobs += 1
            if shared:
                pick = shared[rng.randrange(len(shared))]
                layers.append((pick, 8 * len(f"shared-{plan.seed}-0")))
            config = json.dumps(
                # unique per (repository, manifest): equal configs would be one blob
                {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}, "n": [r, m]}
            ).encode()
            config_hex = _blob(v2, config)
            blobs += 1
            manifest = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": DOCKER_V2,
                    "config": {
                        "mediaType": CONFIG,
                        "size": len(config),
                        "digest": f"sha256:{config_hex}",
                    },
                    "layers": [
                        {"mediaType": LAYER, "size": size, "digest": f"sha256:{h}"}
                        for h, size in layers
                    ],
                },
                indent=3,
            ).encode()
            mhex = _blob(v2, manifest)
            blobs += 1
            manifests += 1
            _link(f"{repo}/_manifests/revisions/sha256/{mhex}/link", mhex)
            _link(f"{repo}/_manifests/tags/v{m}/current/link", mhex)
            _link(f"{repo}/_manifests/tags/v{m}/index/sha256/{mhex}/link", mhex)
            for h in [config_hex, *(h for h, _ in layers)]:
                _link(f"{repo}/_layers/sha256/{h}/link", h)
    return blobs, manifests


def build_orphans(plan: Plan, first: int, last: int) -> int:
    v2 = f"{plan.root}/docker/registry/v2"
    rng = random.Random(plan.seed * 7_000_003 + first)
    for _ in range(first, last):
        _blob(v2, rng.randbytes(rng.randint(64, 256)))
    return last - first


def plan_for(root: Path, blobs: int, repos: int, layers: int, orphans: float, seed: int) -> Plan:
    """Size a plan so the store holds about ``blobs`` blobs."""
    per_manifest = layers + 1  # layers - 1 unique + config + manifest
    orphan_count = int(blobs * orphans)
    manifests = max(1, (blobs - orphan_count) // per_manifest)
    per_repo = max(1, manifests // repos)
    return Plan(str(root), repos, per_repo, layers, max(1, repos // 4), orphan_count, seed)


def generate(plan: Plan, processes: int = 2) -> dict[str, int]:
    v2 = f"{plan.root}/docker/registry/v2"
    for shard in range(256):
        os.makedirs(f"{v2}/blobs/sha256/{shard:02x}", exist_ok=True)
    for i in range(plan.shared):
        _blob(v2, _shared_layer(plan, i))
    step = max(1, plan.repos // (processes * 8))
    ostep = max(1, plan.orphans // (processes * 8))
    with ProcessPoolExecutor(processes) as pool:
        repo_jobs = [
            pool.submit(build_repos, plan, a, min(a + step, plan.repos))
            for a in range(0, plan.repos, step)
        ]
        orphan_jobs = [
            pool.submit(build_orphans, plan, a, min(a + ostep, plan.orphans))
            for a in range(0, plan.orphans, ostep)
        ]
        blobs = manifests = 0
        for job in repo_jobs:
            b, m = job.result()
            blobs, manifests = blobs + b, manifests + m
        orphans = sum(job.result() for job in orphan_jobs)
    return {
        "repositories": plan.repos,
        "manifests": manifests,
        "blobs": blobs + plan.shared + orphans,
        "orphans": orphans,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--blobs", type=int, default=50_000)
    parser.add_argument("--repos", type=int, default=200)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--orphans", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    started = time.monotonic()
    plan = plan_for(args.root, args.blobs, args.repos, args.layers, args.orphans, args.seed)
    counts = generate(plan, args.processes)
    counts["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
