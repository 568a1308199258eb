"""Hard-prune an S3 store written by the real docker-registry on SeaweedFS, through the real CLI."""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from daemon import layout
from tests.conftest import check_logged, pruned, would_delete
from tests.harness.daemon import Daemon
from tests.harness.faultproxy import (
    FaultProxy,
    delete_request_keys,
    is_delete_objects,
    is_get_object,
    is_list,
)
from tests.harness.images import Scenario, build_scenario, pull_kept
from tests.harness.registry import Registry
from tests.harness.seaweed import SeaweedFS
from tests.harness.usage import expected_usage

BLOB_KEY = re.compile(r"blobs/sha256/[0-9a-f]{2}/([0-9a-f]{64})/data$")
PREFIXED = "pre/fix"
# S3 answers HEAD on a blob with a 307 to a presigned GET URL by default; a HEAD that
# follows it fails the signature check, so the registry serves blobs itself here
NO_REDIRECT = {"REGISTRY_STORAGE_REDIRECT_DISABLE": "true"}


@dataclass
class Store:
    """A bucket the real registry wrote (its config names the bucket and root)."""

    weed: SeaweedFS
    bucket: str
    root: str
    registry: Registry
    scenario: Scenario

    def blobs(self) -> set[str]:
        """Digests of every blob in the bucket below the root."""
        prefix = f"{self.root}/" if self.root else ""
        return {
            "sha256:" + m.group(1)
            for key in self.weed.keys(self.bucket, prefix + "docker/registry/v2/blobs/")
            for m in [BLOB_KEY.search(key)]
            if m
        }

    def all_keys(self) -> set[str]:
        return set(self.weed.keys(self.bucket))

    def config_via(self, endpoint: str, path: Path, read_only: bool) -> Path:
        """The registry's config with another regionendpoint (the fault proxy's)."""
        doc = self.registry.config()
        doc["storage"]["s3"]["regionendpoint"] = endpoint
        if read_only:
            doc["storage"]["maintenance"]["readonly"] = {"enabled": True}
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path


def s3_params(weed: SeaweedFS, bucket: str, root: str) -> dict[str, Any]:
    params: dict[str, Any] = {
        "bucket": bucket,
        "region": weed.region,
        "regionendpoint": weed.endpoint,
        "accesskey": weed.access_key,
        "secretkey": weed.secret_key,
    }
    if root:
        params["rootdirectory"] = "/" + root  # as operators write it
    return params


def new_bucket(weed: SeaweedFS) -> str:
    return weed.create_bucket(f"p-{uuid.uuid4().hex[:16]}")


@pytest.fixture(scope="module")
def weed() -> Iterator[SeaweedFS]:
    with SeaweedFS() as server:
        yield server


@pytest.fixture(scope="module")
def stores(
    weed: SeaweedFS, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Store]]:
    """Per root, one bucket the registry filled with the standard scenario (read-only use)."""
    made: dict[str, Store] = {}
    started: list[Registry] = []

    def get(root: str) -> Store:
        if root not in made:
            bucket = new_bucket(weed)
            registry = Registry(
                tmp_path_factory.mktemp("registry"),
                s3=s3_params(weed, bucket, root),
                env=NO_REDIRECT,
            )
            started.append(registry)  # stopped even if the scenario fails half way
            registry.start()
            made[root] = Store(weed, bucket, root, registry, build_scenario(registry))
        return made[root]

    yield get
    for registry in started:
        registry.cleanup()


@pytest.fixture
def fresh(weed: SeaweedFS, stores: Callable[[str], Store], tmp_path: Path) -> Iterator[Store]:
    """A copy of the prefixed scenario bucket with a registry of its own: tests may change it."""
    template = stores(PREFIXED)
    bucket = new_bucket(weed)
    client = weed.client()
    keys = weed.keys(template.bucket)
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda key: client.copy_object(
                    Bucket=bucket, Key=key, CopySource={"Bucket": template.bucket, "Key": key}
                ),
                keys,
            )
        )
    registry = Registry(
        tmp_path / "registry", s3=s3_params(weed, bucket, PREFIXED), env=NO_REDIRECT
    )
    registry.start()
    try:
        yield Store(weed, bucket, PREFIXED, registry, template.scenario)
    finally:
        registry.cleanup()


BODY = web.RequestKey("body", bytes)


class BodyProxy(FaultProxy):
    """The fault proxy, with each request's body at ``request[BODY]`` for predicates, and
    keys the store refuses to delete (as a bucket policy would) while it deletes the rest."""

    def __init__(self, weed: SeaweedFS) -> None:
        super().__init__(weed.endpoint)
        self.weed = weed
        self.refused: set[str] = set()  # full object keys
        self.refusals = 0

    def clear(self) -> None:
        super().clear()
        self.refused.clear()
        self.refusals = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = request[BODY] = await request.read()  # aiohttp keeps it for the second read
        if self.refused and is_delete_objects(request):
            keys = delete_request_keys(body)
            if self.refused.intersection(keys):
                return await self._delete_some(request.path.strip("/").split("/")[0], keys)
        return await super()._handle(request)

    async def _delete_some(self, bucket: str, keys: list[str]) -> web.Response:
        # the request's signature covers its body: the others go upstream in a request of
        # our own, and the answer names each refused key, as S3 does
        others = [{"Key": key} for key in keys if key not in self.refused]
        if others:
            await asyncio.to_thread(
                self.weed.client().delete_objects,
                Bucket=bucket,
                Delete={"Objects": others, "Quiet": True},
            )
        errors = "".join(
            f"<Error><Key>{key}</Key><Code>AccessDenied</Code><Message>refused</Message></Error>"
            for key in keys
            if key in self.refused
        )
        self.refusals += len(keys) - len(others)
        return web.Response(
            status=200,
            content_type="application/xml",
            body=f'<DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{errors}'
            "</DeleteResult>",
        )


@pytest.fixture(scope="module")
def proxy(weed: SeaweedFS) -> Iterator[BodyProxy]:
    """The fault proxy on a loop of its own: the CLI under test is a blocking subprocess."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fault_proxy = asyncio.run_coroutine_threadsafe(BodyProxy(weed).start(), loop).result(10)
    try:
        yield fault_proxy
    finally:
        asyncio.run_coroutine_threadsafe(fault_proxy.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def faults(proxy: BodyProxy) -> Iterator[BodyProxy]:
    """The proxy with no fault armed and fresh counters, disarmed again afterwards."""
    proxy.clear()
    proxy.reset_counts()
    yield proxy
    proxy.clear()


def check(config: Path) -> tuple[int, set[str], str, str]:
    """A check with grace 0 and per-candidate logging: (exit, candidates, stdout, stderr)."""
    result = check_logged(config)
    return result.returncode, would_delete(result.stderr), result.stdout, result.stderr


def is_blob_get(request: web.Request) -> bool:
    """GetObject of a blob: how the storage source reads manifests."""
    return is_get_object(request) and "/blobs/sha256/" in request.path


@pytest.mark.parametrize("root", [PREFIXED, ""], ids=["rootdirectory", "bucket-root"])
def test_check_matches_garbage_collect_digest_for_digest(
    stores: Callable[[str], Store], root: str
) -> None:
    store = stores(root)
    before = store.all_keys()
    v2 = f"{root}/docker/registry/v2/" if root else "docker/registry/v2/"
    assert before and all(key.startswith(v2) for key in before)
    code, ours, stdout, stderr = check(store.registry.config_path)
    assert code == 0, stderr
    peer = store.registry.garbage_collect(dry_run=True)
    assert peer == store.scenario.expected_orphans
    assert ours == peer
    lines = stdout.splitlines()
    assert lines[0] == f"Would delete {len(peer)} blobs"
    assert re.fullmatch(r"Would free up [0-9.]+ (B|KiB|MiB) of disk space", lines[1])
    assert lines[-1] == "Use mode=delete to actually delete the data"
    assert f"s3://{store.bucket}/{root}" in stderr  # the store it read, named in the log
    assert store.all_keys() == before  # check never changes anything


def test_delete_in_read_only_mode_then_everything_kept_pulls(fresh: Store, tmp_path: Path) -> None:
    store, scenario = fresh, fresh.scenario
    refused = pruned("delete", "--registry-config", store.registry.config_path, "--grace", "0")
    assert refused.returncode == 2 and "read-only" in refused.stderr
    store.registry.restart(read_only=True)
    result = pruned("delete", "--registry-config", store.registry.config_path, "--grace", "0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"Deleted {len(scenario.expected_orphans)} blobs"
    assert lines[1].startswith("Freed up ")
    assert store.blobs() == scenario.pushed - scenario.expected_orphans
    assert not [key for key in store.all_keys() if "_registry-pruned" in key]  # lease released
    assert store.registry.garbage_collect(dry_run=True) == set()
    assert store.registry.garbage_collect(dry_run=False) == set()  # runs cleanly, for real
    store.registry.restart(read_only=False)
    pull_kept(store.registry.url, scenario.kept, tmp_path)
    again = pruned("check", "--registry-config", store.registry.config_path, "--grace", "0")
    assert again.stdout.splitlines()[0] == "Would delete 0 blobs"


def test_marking_under_transient_faults_gives_the_same_answer(
    stores: Callable[[str], Store], faults: FaultProxy, tmp_path: Path
) -> None:
    store = stores(PREFIXED)
    config = store.config_via(faults.url, tmp_path / "config.yml", read_only=False)
    # at most four faults per kind of request: each one is retried five times
    faults.inject("slowdown", 2, match=is_list)
    faults.inject("reset", 1, match=is_list)
    faults.inject("internal", 1, match=is_list)
    faults.inject("slowdown", 1, match=is_blob_get)
    faults.inject("internal", 1, match=is_blob_get)
    faults.inject("reset", 1, match=is_blob_get)
    faults.inject("reset_after", 1, match=is_get_object)
    code, ours, _stdout, stderr = check(config)
    assert code == 0, stderr
    assert faults.injected == {"slowdown": 3, "internal": 2, "reset": 2, "reset_after": 1}
    assert "s3 request retried" in stderr
    assert ours == store.scenario.expected_orphans


def test_corrupt_revision_link_fails_closed(fresh: Store) -> None:
    """The listing's ETag proves most links' content; one that it does not prove is read."""
    store, scenario = fresh, fresh.scenario
    image = next(i for i in scenario.images if i.repository == "app" and i.tag == "v1")
    revision = layout.revision_dir("app", image.digest.split(":")[1])
    key = f"{PREFIXED}/docker/registry/v2/{revision}link"
    store.weed.client().put_object(Bucket=store.bucket, Key=key, Body=b"sha256:not-a-digest")
    store.registry.restart(read_only=True)
    before = store.all_keys()
    result = pruned("delete", "--registry-config", store.registry.config_path, "--grace", "0")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "is corrupt" in result.stderr and revision in result.stderr
    assert not result.stdout.startswith("Deleted")
    assert store.all_keys() == before


MANIFEST_LINE = re.compile(r"Would delete manifest: (\S+)@(sha256:[0-9a-f]{64})")


def test_untagged_check_proves_tag_links_from_the_listing_and_reads_the_rest(
    fresh: Store, faults: FaultProxy, tmp_path: Path
) -> None:
    """A tag's current/link is proven by its listed ETag (the MD5 of the link text) matching
    one of the tag's index entries: no GET. A link rewritten to a digest none of its entries
    names, or uploaded in parts (no MD5 in the ETag), is read: the run follows what it says."""
    store, scenario = fresh, fresh.scenario
    config = store.config_via(faults.url, tmp_path / "config.yml", read_only=False)

    def untagged_check() -> tuple[set[tuple[str, str]], list[str]]:
        faults.reset_counts()
        result = check_logged(config, "--untagged")
        assert result.returncode == 0, result.stderr[-3000:]
        removed = {(m.group(1), m.group(2)) for m in MANIFEST_LINE.finditer(result.stderr)}
        reads = [
            s.path_qs for s in faults.seen if s.method == "GET" and "/current/link" in s.path_qs
        ]
        return removed, reads

    app = {i.tag: i.digest for i in scenario.images if i.repository == "app"}
    old = next(
        i.digest
        for i in scenario.images
        if i.repository == "app" and i.tag is None and i.digest in scenario.untagged_eligible
    )
    removed, reads = untagged_check()
    assert ("app", old) in removed and ("app", app["v2"]) not in removed
    assert reads == []  # every tag the registry wrote is proven by its listing

    def tag_key(tag: str) -> str:
        return f"{PREFIXED}/docker/registry/v2/repositories/app/_manifests/tags/{tag}/current/link"

    client = store.weed.client()
    # app:v2 now names the old latest: a new ETag, which no index entry of v2 matches
    client.put_object(Bucket=store.bucket, Key=tag_key("v2"), Body=old.encode())
    # app:v1 the same as before, uploaded in one part of a multipart upload: "<md5>-1"
    upload = client.create_multipart_upload(Bucket=store.bucket, Key=tag_key("v1"))
    part = client.upload_part(
        Bucket=store.bucket,
        Key=tag_key("v1"),
        PartNumber=1,
        UploadId=upload["UploadId"],
        Body=app["v1"].encode(),
    )
    client.complete_multipart_upload(
        Bucket=store.bucket,
        Key=tag_key("v1"),
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )
    listed = client.list_objects_v2(Bucket=store.bucket, Prefix=tag_key("v1"))["Contents"]
    assert "-" in listed[0]["ETag"]

    removed_after, reads = untagged_check()
    # read by GET, each once: v2 keeps the old latest now, and its own revision goes
    assert sorted(path.split("/tags/")[1] for path in reads) == [
        "v1/current/link",
        "v2/current/link",
    ]
    assert removed_after == (removed - {("app", old)}) | {("app", app["v2"])}


def test_persistent_fault_while_marking_fails_closed(
    fresh: Store, faults: FaultProxy, tmp_path: Path
) -> None:
    store = fresh
    store.registry.restart(read_only=True)
    config = store.config_via(faults.url, tmp_path / "config.yml", read_only=True)
    before = store.all_keys()
    faults.inject("slowdown", None, match=is_blob_get)
    result = pruned("delete", "--registry-config", config, "--grace", "0")
    assert result.returncode == 1, result.stdout + result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: cannot read manifests") and "SlowDown" in error, error
    assert "after 5 attempts" in error
    assert not result.stdout.startswith("Deleted")
    # the only deletes sent are of the run's own objects: its conditional-write probe and
    # the release of its lease
    deleted = {
        key
        for seen in faults.seen
        if seen.method == "POST" and "?delete" in seen.path_qs
        for key in delete_request_keys(seen.body)
    }
    own = f"{PREFIXED}/docker/registry/v2/_registry-pruned/"
    assert deleted == {own + "lease.json", own + "conditional-write-probe"}
    assert store.all_keys() == before


def test_delete_under_faults_keeps_every_kept_blob_then_a_rerun_finishes(
    fresh: Store, faults: BodyProxy, tmp_path: Path
) -> None:
    store, scenario = fresh, fresh.scenario
    store.registry.restart(read_only=True)
    config = store.config_via(faults.url, tmp_path / "config.yml", read_only=True)
    v2 = f"{PREFIXED}/docker/registry/v2/"
    # two orphans whose layer links the store refuses to remove: they must stay, as must
    # everything in use, and no link may be left pointing at a deleted blob
    stuck = sorted(scenario.orphan_uploads)[:2]
    faults.refused = {
        f"{v2}{layout.layer_link_dir(repo, d.split(':')[1])}link" for repo, d in stuck
    }

    def blob_batch(request: web.Request) -> bool:
        return is_delete_objects(request) and b"/blobs/sha256/" in request.get(BODY, b"")

    faults.inject("slowdown", 1, match=blob_batch)
    faults.inject("internal", 1, match=blob_batch)
    faults.inject("reset_after", 1, match=blob_batch)  # deleted, but the answer is lost
    faults.inject("delete_errors", 1, match=blob_batch, code="SlowDown")  # per key, retried
    result = pruned("delete", "--registry-config", config, "--grace", "0")
    assert result.returncode == 1, result.stdout + result.stderr
    deleted = len(scenario.expected_orphans) - len(stuck)
    assert result.stdout.splitlines()[0] == f"Deleted {deleted} blobs"
    error = result.stderr.strip().splitlines()[-1]
    assert error == (
        f"error: {len(stuck)} deletes failed (see the log); {deleted} blobs were deleted; "
        "run again to finish"
    )
    assert faults.refusals == len(stuck)
    assert faults.injected == {"slowdown": 1, "internal": 1, "reset_after": 1, "delete_errors": 1}
    remaining = store.blobs()
    assert remaining == scenario.pushed - scenario.expected_orphans | {d for _r, d in stuck}
    links = [k for k in store.all_keys() if "/_layers/sha256/" in k]
    assert faults.refused <= set(links)
    assert {"sha256:" + k.split("/")[-2] for k in links} <= remaining  # none dangles

    faults.clear()
    again = pruned("delete", "--registry-config", config, "--grace", "0")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == f"Deleted {len(stuck)} blobs"
    assert store.blobs() == scenario.pushed - scenario.expected_orphans
    assert store.registry.garbage_collect(dry_run=True) == set()


@pytest.mark.parametrize(("phase", "deleted"), [("mark", 0), ("delete", 1)])
def test_sigkill_mid_delete_then_restart_finishes(
    fresh: Store, tmp_path: Path, phase: str, deleted: int
) -> None:
    import hashlib
    import random
    import signal

    from tests.harness.daemon import Daemon
    from tests.test_safety_crash import wait_for

    store, scenario = fresh, fresh.scenario
    rng = random.Random(phase)
    planted = {}
    for _ in range(3000):
        data = rng.randbytes(48)
        hexd = hashlib.sha256(data).hexdigest()
        planted[f"{store.root}/docker/registry/v2/{layout.blob_data(hexd)}"] = data
    asyncio.run(store.weed.seed(store.bucket, planted))
    store.registry.restart(read_only=True)
    state = tmp_path / "state"
    daemon = Daemon(store.registry.config_path, state, "--grace", "0").start()
    try:
        _status, run = daemon.json("POST", "/prune?mode=delete")
        reached = wait_for(daemon, run["id"], phase, deleted)
        daemon.terminate(signal.SIGKILL)
    finally:
        daemon.stop()
    assert reached["state"] == "running", reached
    assert scenario.in_use <= store.blobs()
    again = Daemon(store.registry.config_path, state, "--grace", "0").start()
    try:
        assert again.json("GET", "/runs")[1][0]["state"] == "interrupted"
        final = again.json("POST", "/prune?mode=delete&wait=true")[1]
        assert final["state"] == "succeeded", final
    finally:
        again.stop()
    assert store.blobs() == scenario.in_use
    store.registry.restart(read_only=False)
    pull_kept(store.registry.url, scenario.kept, tmp_path)


def test_usage_per_repository_from_the_listing_sizes(
    stores: Callable[[str], Store], tmp_path: Path
) -> None:
    """On S3 the sizes come from the shard listings: the same report as tallied by hand."""
    store = stores(PREFIXED)
    client = store.weed.client()

    def size_of(hexdigest: str) -> int:
        key = f"{PREFIXED}/{layout.V2_ROOT}/{layout.blob_data(hexdigest)}"
        return int(client.head_object(Bucket=store.bucket, Key=key)["ContentLength"])

    expected = expected_usage(store.registry, store.scenario, size_of)
    daemon = Daemon(store.registry.config_path, tmp_path / "state", "--grace", "0").start()
    try:
        status, run = daemon.json("POST", "/prune?mode=check&wait=true")
        assert status == 200 and run["state"] == "succeeded", run
        status, report = daemon.json("GET", f"/runs/{run['id']}/usage")
    finally:
        daemon.stop()
    assert status == 200
    rows = {r["repository"]: r for r in report["repositories"]}
    for repo, want in expected.items():
        assert {k: rows[repo][k] for k in want} == want, repo
    assert report["repositories"][0]["repository"] == max(
        expected, key=lambda r: expected[r]["exclusive_bytes"]
    )


def differing(now: dict[str, str], before: dict[str, str]) -> list[str]:
    """Keys missing, added or changed (a short list: pytest's diff of big dicts takes ages)."""
    return sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))[:20]


def bucket_snapshot(store: Store) -> dict[str, str]:
    """Every registry key of the bucket and the sha256 of its content (our own
    ``_registry-pruned/`` bookkeeping left out)."""
    import hashlib

    client = store.weed.client()
    return {
        key: hashlib.sha256(
            client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
        ).hexdigest()
        for key in registry_keys(store)
    }


def registry_keys(store: Store) -> set[str]:
    """Every key of the bucket but our own ``_registry-pruned/`` bookkeeping."""
    return {k for k in store.all_keys() if f"/{layout.OWN}" not in k}


def test_delete_with_trash_then_restore_gives_the_same_bucket(fresh: Store, tmp_path: Path) -> None:
    """Server-side copies into the trash, batched deletes, and back: key for key, byte for byte."""
    store, scenario = fresh, fresh.scenario
    before = bucket_snapshot(store)
    store.registry.restart(read_only=True)
    state = tmp_path / "state"
    args = ("--registry-config", store.registry.config_path, "--grace", "0", "--state-dir", state)
    result = pruned("delete", *args, "--trash", "7d", "--upload-max-age", "0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"Deleted {len(scenario.expected_orphans)} blobs"
    assert lines[1].startswith(f"Moved {len(scenario.expected_orphans)} blobs (")
    assert store.blobs() == scenario.in_use
    after = bucket_snapshot(store)
    moved = set(before) - set(after)
    assert any("/_uploads/" in key for key in moved) and any("/_layers/" in key for key in moved)
    trashed = {k for k in store.all_keys() if f"/{layout.OWN}trash/" in k}
    (run_id,) = [p.stem for p in (state / "runs").glob("*.json")]
    root = f"{store.root}/{layout.V2_ROOT}/"
    assert {f"{root}{layout.OWN}trash/{run_id}/{k[len(root) :]}" for k in moved} <= trashed
    daemon = Daemon(store.registry.config_path, state, "--grace", "0").start()
    try:
        status, doc = daemon.json("POST", f"/runs/{run_id}/restore")
        assert status == 200 and doc["state"] == "restored", doc
        assert doc["restore"]["objects"] == len(moved)
        status, again = daemon.json("POST", f"/runs/{run_id}/restore")  # idempotent
        assert status == 200 and again["restore"] == doc["restore"], again
    finally:
        daemon.stop()
    assert differing(bucket_snapshot(store), before) == []
    store.registry.restart(read_only=False)
    pull_kept(store.registry.url, scenario.kept, tmp_path)


def test_sigkill_mid_move_to_the_trash_and_mid_restore(fresh: Store, tmp_path: Path) -> None:
    """Copies made, sources not yet deleted: the next delete puts the dead run's trash back
    (dropping the copies whose originals stayed), and the next restore finishes a killed one.
    Each key ends once in the bucket, with its bytes."""
    import hashlib
    import signal
    import subprocess
    import sys
    import time

    from tests.test_safety_crash import wait_for

    store, scenario = fresh, fresh.scenario
    rng = __import__("random").Random(17)
    planted = {}
    for _ in range(3000):
        data = rng.randbytes(48)
        hexd = hashlib.sha256(data).hexdigest()
        planted[f"{store.root}/docker/registry/v2/{layout.blob_data(hexd)}"] = data
    asyncio.run(store.weed.seed(store.bucket, planted))
    before = bucket_snapshot(store)
    store.registry.restart(read_only=True)
    state = tmp_path / "state"
    daemon = Daemon(store.registry.config_path, state, "--grace", "0").start()
    try:
        _status, run = daemon.json("POST", "/prune?mode=delete&trash=7d")
        reached = wait_for(daemon, run["id"], "delete", 1)
        daemon.terminate(signal.SIGKILL)
    finally:
        daemon.stop()
    assert reached["state"] == "running", reached
    trash_prefix = f"{store.root}/{layout.V2_ROOT}/{layout.OWN}trash/"
    trashed = [k for k in store.all_keys() if k.startswith(trash_prefix + run["id"] + "/blobs/")]
    assert trashed, "killed before anything was moved"
    again = Daemon(store.registry.config_path, state, "--grace", "0").start()
    try:
        started = again.json("POST", "/prune?mode=delete&trash=7d")[1]
        final = again.wait_done(started["id"], timeout=300)
        assert final["state"] == "succeeded", final
        assert store.blobs() == scenario.in_use
        left = {
            k.split("/")[len(trash_prefix.split("/")) - 1]
            for k in store.all_keys()
            if k.startswith(trash_prefix)
        }
        assert left == {final["id"]}  # the dead run's trash went back, then into this one
    finally:
        again.stop()
    cmd = [
        sys.executable,
        "-m",
        "daemon",
        "restore",
        final["id"],
        "--registry-config",
        str(store.registry.config_path),
        "--state-dir",
        str(state),
    ]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(store.blobs()) < len(scenario.in_use) + 500:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the keys alone tell a restore cut short (a snapshot GETs every key: 8-15 s here)
    assert registry_keys(store) != before.keys(), "the restore ended before the kill"
    finished = pruned(
        "restore",
        final["id"],
        "--registry-config",
        store.registry.config_path,
        "--state-dir",
        state,
    )
    assert finished.returncode == 0, finished.stderr
    assert differing(bucket_snapshot(store), before) == []
    store.registry.restart(read_only=False)
    pull_kept(store.registry.url, scenario.kept, tmp_path)
