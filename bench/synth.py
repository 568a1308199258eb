"""Synthetic registry store: real digests, real schema2 manifests, distribution's layout.

    python bench/synth.py DIR --blobs 50000 [--repos 200] [--layers 5] [--orphans 0.1]
                          [--revisions 1]

With ``--revisions N`` each tag is pushed N times: its last manifest is current, the others
are old revisions in its history (untagged, what ``--untagged`` reclaims).

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
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
CONFIG = "application/vnd.docker.container.image.v1+json"
OLD = time.time() - 2 * 86400

#: (path below ``docker/registry/v2/``, content) of each object a job makes
Objects = Iterator[tuple[str, bytes]]
Maker = Callable[..., Objects]
R = TypeVar("R")


@dataclass(frozen=True)
class Plan:
    root: str
    repos: int
    manifests_per_repo: int
    layers: int
    shared: int
    orphans: int
    seed: int
    revisions: int = 1  # manifests per tag: the last is current, the others old revisions


V2 = "docker/registry/v2"


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


def _blob(data: bytes) -> tuple[str, str, bytes]:
    hexd = hashlib.sha256(data).hexdigest()
    return hexd, f"blobs/sha256/{hexd[:2]}/{hexd}/data", data


def _link(path: str, hexd: str) -> tuple[str, bytes]:
    return path, f"sha256:{hexd}".encode()


def _repo_name(i: int) -> str:
    # a third of the names have three components, like OpenShift's and distribution's users
    return f"team{i % 7}/proj{i % 3}/app{i}" if i % 3 == 0 else f"ns{i % 11}/app{i}"


def _shared_layer(plan: Plan, i: int) -> bytes:
    return f"shared-{plan.seed}-{i}".encode() * 8


def repo_objects(plan: Plan, first: int, last: int) -> Objects:
    """Repositories [first, last): their manifests, configs, layers and links, as
    (path below ``docker/registry/v2/``, content); the same for the same plan and range."""
    rng = random.Random(plan.seed * 1_000_003 + first)
    # (digest, size): the shared layers' sizes differ (a longer index, a longer layer)
    shared = [
        (hashlib.sha256(data).hexdigest(), len(data))
        for data in (_shared_layer(plan, i) for i in range(plan.shared))
    ]
    for r in range(first, last):
        repo = f"repositories/{_repo_name(r)}"
        for m in range(plan.manifests_per_repo):
            layers = []
            for _ in range(plan.layers - 1):
                hexd, path, data = _blob(rng.randbytes(rng.randint(64, 256)))
                yield path, data
                layers.append((hexd, len(data)))
            if shared:
                layers.append(shared[rng.randrange(len(shared))])
            config_hex, path, config = _blob(
                json.dumps(
                    # unique per (repository, manifest): equal configs would be one blob
                    {
                        "architecture": "amd64",
                        "os": "linux",
                        "rootfs": {"type": "layers"},
                        "n": [r, m],
                    }
                ).encode()
            )
            yield path, config
            manifest = {
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
            }
            mhex, path, data = _blob(json.dumps(manifest, indent=3).encode())
            yield path, data
            yield _link(f"{repo}/_manifests/revisions/sha256/{mhex}/link", mhex)
            tag = f"v{m // plan.revisions}"
            # a tag's later push overwrites its current link: the last one written stays
            yield _link(f"{repo}/_manifests/tags/{tag}/current/link", mhex)
            yield _link(f"{repo}/_manifests/tags/{tag}/index/sha256/{mhex}/link", mhex)
            for h in [config_hex, *(h for h, _ in layers)]:
                yield _link(f"{repo}/_layers/sha256/{h}/link", h)


def orphan_objects(plan: Plan, first: int, last: int) -> Objects:
    """Orphans [first, last): blobs that nothing references."""
    rng = random.Random(plan.seed * 7_000_003 + first)
    for _ in range(first, last):
        yield _blob(rng.randbytes(rng.randint(64, 256)))[1:]


def shared_objects(plan: Plan) -> Objects:
    """The layers a quarter of the repositories share."""
    for i in range(plan.shared):
        yield _blob(_shared_layer(plan, i))[1:]


def jobs(plan: Plan, processes: int) -> list[tuple[Maker, int, int]]:
    """The store cut into ranges for ``processes`` workers; the cut decides the content."""
    step = max(1, plan.repos // (processes * 8))
    ostep = max(1, plan.orphans // (processes * 8))
    return [
        *((repo_objects, a, min(a + step, plan.repos)) for a in range(0, plan.repos, step)),
        *((orphan_objects, a, min(a + ostep, plan.orphans)) for a in range(0, plan.orphans, ostep)),
    ]


def made(plan: Plan, processes: int, work: Callable[..., R], *head: object) -> Iterator[R]:
    """``work(*head, make, *args)`` for the shared layers here, then for every job of the
    store in ``processes`` worker processes."""
    yield work(*head, shared_objects, plan)
    with ProcessPoolExecutor(processes) as pool:
        parts = [pool.submit(work, *head, make, plan, a, b) for make, a, b in jobs(plan, processes)]
        for part in parts:
            yield part.result()


def _to_disk(v2: str, make: Maker, *args: object) -> Counter[str]:
    """Write one job's objects below ``v2``; how many blobs and manifests."""
    counts: Counter[str] = Counter()
    for path, data in make(*args):
        _write(f"{v2}/{path}", data, fresh_dir=True)
        counts["blobs"] += path.startswith("blobs/")
        counts["manifests"] += "/_manifests/revisions/" in path
    return counts


def in_memory(make: Maker, *args: object) -> dict[str, bytes]:
    """One job's objects, keyed as in a bucket (``docker/registry/v2/...``)."""
    return {f"{V2}/{path}": data for path, data in make(*args)}


def plan_for(
    root: Path,
    blobs: int,
    repos: int,
    layers: int,
    orphans: float,
    seed: int,
    revisions: int = 1,
) -> Plan:
    """Size a plan so the store holds about ``blobs`` blobs."""
    per_manifest = layers + 1  # layers - 1 unique + config + manifest
    orphan_count = int(blobs * orphans)
    manifests = max(1, (blobs - orphan_count) // per_manifest)
    per_repo = max(1, manifests // repos)
    return Plan(
        str(root), repos, per_repo, layers, max(1, repos // 4), orphan_count, seed, revisions
    )


def generate(plan: Plan, processes: int = 2) -> dict[str, int]:
    """Write the store below ``plan.root``; its counts."""
    v2 = f"{plan.root}/{V2}"
    for shard in range(256):
        os.makedirs(f"{v2}/blobs/sha256/{shard:02x}", exist_ok=True)
    counts = sum(made(plan, processes, _to_disk, v2), Counter[str]())
    return {
        "repositories": plan.repos,
        "manifests": counts["manifests"],
        "blobs": counts["blobs"],
        "orphans": plan.orphans,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--blobs", type=int, default=50_000)
    parser.add_argument("--repos", type=int, default=200)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--orphans", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--revisions", type=int, default=1, help="manifests per tag")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    started = time.monotonic()
    plan = plan_for(
        args.root, args.blobs, args.repos, args.layers, args.orphans, args.seed, args.revisions
    )
    counts = generate(plan, args.processes)
    counts["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
