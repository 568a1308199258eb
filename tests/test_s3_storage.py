"""The S3 driver against a real SeaweedFS, directly and through a fault-injecting proxy."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock
from urllib.parse import quote, unquote

import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError, EndpointConnectionError, HTTPClientError

from daemon import layout
from daemon.config import S3Settings, StorageSettings, load_settings
from daemon.inventory import Inventory
from daemon.storage.base import Conflict, Entry, NotFound, StorageError, TooLarge
from daemon.storage.s3 import (
    BATCH,
    GetSigner,
    RetryPolicy,
    S3Storage,
    _endpoint_url,
    create,
    is_transient,
)
from tests.harness.faultproxy import (
    FaultProxy,
    delete_request_keys,
    is_delete_objects,
    is_list,
)
from tests.harness.seaweed import SeaweedFS

session_loop = pytest.mark.asyncio(loop_scope="session")

FAST = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05, read_timeout=5.0)
MakeStorage = Callable[..., S3Storage]


def hexes(count: int, shard: str | None = None, seed: int = 0) -> list[str]:
    """``count`` distinct random sha256 hex digests, all in ``shard`` if given."""
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < count:
        value = f"{rng.getrandbits(256):064x}"
        out.add(shard + value[2:] if shard else value)
    return sorted(out)


def new_bucket(weed: SeaweedFS) -> str:
    return weed.create_bucket(f"t-{uuid.uuid4().hex[:16]}")


async def put_all(storage: S3Storage, items: dict[str, bytes]) -> None:
    await asyncio.gather(*(storage.write(key, data) for key, data in items.items()))


async def walk_keys(storage: S3Storage, prefix: str) -> list[Entry]:
    return [entry async for batch in storage.walk(prefix) for entry in batch]


@pytest.fixture(scope="session")
def weed() -> Iterator[SeaweedFS]:
    with SeaweedFS() as server:
        yield server


@pytest_asyncio.fixture(loop_scope="session")
async def make_storage(weed: SeaweedFS) -> AsyncIterator[MakeStorage]:
    made: list[S3Storage] = []

    def make(
        bucket: str,
        root: str = "",
        endpoint: str | None = None,
        concurrency: int = 16,
        retry: RetryPolicy = FAST,
        reader: bool = False,
    ) -> S3Storage:
        settings = weed.settings(bucket, root, endpoint=endpoint, reader=reader)
        storage = S3Storage(settings, concurrency, retry)
        made.append(storage)
        return storage

    yield make
    for storage in made:
        await storage.close()


@pytest_asyncio.fixture(loop_scope="session")
async def proxy(weed: SeaweedFS) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(weed.endpoint) as fault_proxy:
        yield fault_proxy


class Seeded:
    """A bucket with a rootdirectory, >1000 blobs in one shard and many repositories."""

    root = "seeded/root"
    shard = "ab"

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.blobs = {h: h.encode()[: 1 + int(h[-2:], 16) % 60] for h in hexes(1100, self.shard)}
        self.others = {h: b"x" for h in hexes(40, seed=1)}
        self.repo_keys: dict[str, bytes] = {}
        for n in range(24):
            repo = f"ns{n % 5}/app{n}"
            for h in hexes(3, seed=100 + n):
                link = f"sha256:{h}".encode()
                self.repo_keys[f"{layout.layer_link_dir(repo, h)}link"] = link
                self.repo_keys[f"{layout.revision_dir(repo, h)}link"] = link
            self.repo_keys[f"repositories/{repo}/_manifests/tags/latest/current/link"] = b"l"
        self.repo_keys["repositories/stray-file"] = b"top level file"

    def blob_items(self) -> dict[str, bytes]:
        items = {layout.blob_data(h): data for h, data in self.blobs.items()}
        items.update({layout.blob_data(h): data for h, data in self.others.items()})
        return items


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def seeded(weed: SeaweedFS) -> AsyncIterator[Seeded]:
    data = Seeded(new_bucket(weed))
    prefix = f"{data.root}/docker/registry/v2/"
    items = {**data.blob_items(), **data.repo_keys}
    await weed.seed(data.bucket, {prefix + key: value for key, value in items.items()})
    yield data


# -- no I/O -----------------------------------------------------------------------------


def test_endpoint_and_construction_do_no_io() -> None:
    assert _endpoint_url("minio.local:9000", secure=False) == "http://minio.local:9000"
    assert _endpoint_url("minio.local:9000", secure=True) == "https://minio.local:9000"
    assert _endpoint_url("https://s3.example/", secure=False) == "https://s3.example"
    assert _endpoint_url(None, secure=True) is None
    settings = StorageSettings("s3", "/a/b/", S3Settings(bucket="bkt", regionendpoint="h:1"))
    storage = create(settings, concurrency=7)
    assert storage.concurrency == 7
    assert storage.prefix == "a/b/docker/registry/v2/"
    assert create(StorageSettings("s3", "", S3Settings("bkt")), 3).prefix == "docker/registry/v2/"
    with pytest.raises(ValueError):
        create(StorageSettings("filesystem", "/x"), 3)


@pytest.mark.parametrize("token", [None, "session/token+="])
@pytest.mark.parametrize(
    "base",
    [
        "http://127.0.0.1:9000/bucket/",
        "https://bucket.s3.eu-west-1.amazonaws.com/",
        "https://s3.example.com:443/bucket/",
        "http://[::1]:9000/bucket/",
    ],
)
def test_get_signer_signs_as_botocore(base: str, token: str | None) -> None:
    """Our GETs' SigV4 headers are botocore's own (S3SigV4Auth), byte for byte."""
    when = datetime(2026, 12, 1, 4, 30, 5)
    credentials = Credentials("AKIDEXAMPLE", "se/cr+et", token).get_frozen_credentials()
    signer = GetSigner("eu-west-1", base)
    listing = {"list-type": "2", "prefix": "pre/a b+c/", "continuation-token": "a/b=="}
    for full, query in (("pre/fix/blobs/sha256/ab/x y+z~/data", {}), ("", listing)):
        path = signer.base_path + quote(full, safe="/~")
        path = path[:-1] if not full and path != "/" else path
        encoded = "&".join(f"{k}={quote(v, safe='-_.~')}" for k, v in query.items())
        request = AWSRequest("GET", signer.origin + path + ("?" + encoded if encoded else ""))
        with mock.patch("botocore.auth.get_current_datetime", return_value=when):
            S3SigV4Auth(credentials, "s3", "eu-west-1").add_auth(request)
        ours = signer.headers(path, encoded, credentials, when.replace(tzinfo=UTC).timestamp())
        assert ours == dict(request.headers.items())


def test_transient_classification() -> None:
    def client_error(code: str, status: int) -> ClientError:
        meta = {"HTTPStatusCode": status}
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": meta}, "Op")

    assert is_transient(client_error("SlowDown", 503))
    assert is_transient(client_error("InternalError", 500))
    assert is_transient(client_error("Whatever", 502))
    assert not is_transient(client_error("NoSuchKey", 404))
    assert not is_transient(client_error("AccessDenied", 403))
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(ConnectionResetError())
    assert not is_transient(HTTPClientError(error=FileNotFoundError(2, "no CA bundle")))
    policy = RetryPolicy(base_delay=1.0, max_delay=4.0)
    rng = random.Random(0)
    assert all(0.5 <= policy.delay(1, rng) <= 1.0 for _ in range(50))
    assert all(2.0 <= policy.delay(9, rng) <= 4.0 for _ in range(50))


# -- round trips ------------------------------------------------------------------------


@session_loop
@pytest.mark.parametrize("root", ["", "/some/registry/root/"])
async def test_round_trip(weed: SeaweedFS, make_storage: MakeStorage, root: str) -> None:
    bucket = new_bucket(weed)
    storage = make_storage(bucket, root)
    blob_a, blob_b = hexes(2, "3f")
    link = f"sha256:{blob_a}".encode()
    items = {
        layout.blob_data(blob_a): b"manifest",
        layout.blob_data(blob_b): b"",
        layout.blob_dir(blob_a) + "stray": b"not data",
        "blobs/sha256/3f/not-a-digest/data": b"junk",
        layout.revision_dir("ns/app", blob_a) + "link": link,
        "repositories/ns/app/_manifests/tags/v1/current/link": link,
        "repositories/top/_layers/sha256/" + blob_b + "/link": b"sha256:" + blob_b.encode(),
    }
    started = time.time()
    await put_all(storage, items)
    written = time.time()  # a write the store answers late (and is retried) is still inside
    prefix = storage.prefix
    assert prefix == (f"{root.strip('/')}/docker/registry/v2/" if root else "docker/registry/v2/")
    assert weed.keys(bucket) == sorted(prefix + key for key in items)
    # something outside the root is never seen
    weed.client().put_object(Bucket=bucket, Key="outside/docker/registry/v2/blobs/x", Body=b"")

    await storage.probe()
    assert await storage.read(layout.blob_data(blob_a), 100) == b"manifest"
    assert await storage.read(layout.blob_data(blob_b), 0) == b""
    entry = await storage.stat(layout.blob_data(blob_a))
    assert entry is not None and entry.size == 8 and entry.key == layout.blob_data(blob_a)
    # LastModified is whole seconds: within the window of the writes, a second either side
    assert entry.mtime is not None and started - 1 <= entry.mtime <= written + 1

    shard = await storage.list_blob_shard("3f")
    assert {(b.hex, b.size) for b in shard} == {(blob_a, 8), (blob_b, 0)}
    # LastModified from the listing, with whole-second precision on SeaweedFS
    assert all(b.mtime is not None and started - 1 <= b.mtime <= written + 1 for b in shard)
    assert await storage.list_blob_shard("00") == []

    walked = await walk_keys(storage, "repositories/")
    assert sorted(e.key for e in walked) == sorted(k for k in items if k.startswith("repo"))
    assert all(e.size == len(items[e.key]) and e.mtime for e in walked)
    everything = await walk_keys(storage, "")
    assert sorted(e.key for e in everything) == sorted(items)

    assert await storage.list_dir("repositories/") == ([], ["ns", "top"])
    assert await storage.list_dir("repositories/ns/app/_manifests/tags/v1/current") == (
        ["link"],
        [],
    )
    assert await storage.list_dir("") == ([], ["blobs", "repositories"])
    assert await storage.list_dir("nothing/here/") == ([], [])

    await storage.write(layout.blob_data(blob_a), b"replaced")
    assert await storage.read(layout.blob_data(blob_a), 8) == b"replaced"


@session_loop
async def test_missing_and_too_large(weed: SeaweedFS, make_storage: MakeStorage) -> None:
    storage = make_storage(new_bucket(weed), "r")
    assert await storage.stat("blobs/sha256/00/none/data") is None
    with pytest.raises(NotFound):
        await storage.read("repositories/x/_layers/sha256/none/link", 100)
    await storage.write("repositories/big", b"y" * 5000)
    with pytest.raises(TooLarge):
        await storage.read("repositories/big", 4999)
    # missing keys are not failures; keys that are not objects are refused
    assert await storage.delete_keys(["repositories/none", "repositories/none"]) == []
    failures = await storage.delete_keys(["", "repositories/"])
    assert sorted(f.key for f in failures) == ["", "repositories/"]
    assert [f.key for f in await storage.delete_blobs(["nothex"])] == ["nothex"]
    with pytest.raises(ValueError):
        await storage.delete_tree("/")
    with pytest.raises(ValueError):
        await storage.list_blob_shard("zz")


@session_loop
async def test_plain_http_ignores_broken_ca_bundle(
    weed: SeaweedFS, make_storage: MakeStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiobotocore would load AWS_CA_BUNDLE even for http:// and fail on a bad path
    monkeypatch.setenv("AWS_CA_BUNDLE", "/nonexistent/ca.pem")
    storage = make_storage(new_bucket(weed))
    await storage.write("repositories/a/link", b"x")
    assert await storage.read("repositories/a/link", 10) == b"x"


@session_loop
async def test_seeded_listing(seeded: Seeded, make_storage: MakeStorage, proxy: FaultProxy) -> None:
    storage = make_storage(seeded.bucket, seeded.root, concurrency=4)
    shard = await storage.list_blob_shard(seeded.shard)  # two ListObjectsV2 pages
    assert {(b.hex, b.size) for b in shard} == {(h, len(d)) for h, d in seeded.blobs.items()}
    total = 0
    for shard_name in layout.SHARDS:
        total += len(await storage.list_blob_shard(shard_name))
    assert total == len(seeded.blobs) + len(seeded.others)
    walked = await walk_keys(storage, "repositories/")
    assert sorted(e.key for e in walked) == sorted(seeded.repo_keys)
    files, dirs = await storage.list_dir("repositories/")
    assert files == ["stray-file"]
    assert dirs == [f"ns{n}" for n in range(5)]
    blobs = await walk_keys(storage, layout.BLOBS)
    assert len(blobs) == len(seeded.blobs) + len(seeded.others)
    # repositories/ is split per namespace and per repository; deeper prefixes are not
    counted = make_storage(seeded.bucket, seeded.root, endpoint=proxy.url)
    proxy.reset_counts()
    assert len(await walk_keys(counted, "repositories/")) == len(seeded.repo_keys)
    assert proxy.requests == 1 + 5 + 24
    proxy.reset_counts()
    layers = await walk_keys(counted, "repositories/ns0/app0/_layers/sha256/")
    assert len(layers) == 3 and proxy.requests == 1
    # a consumer that stops early leaves no listing running
    async with contextlib.aclosing(storage.walk("repositories/")) as batches:
        async for batch in batches:
            assert batch
            break


@session_loop
async def test_read_many_keeps_concurrency_reads_in_flight(
    seeded: Seeded, make_storage: MakeStorage
) -> None:
    # issue 19: a task per key of every worker's chunk held ~15 MB in a 1M delete's verify
    storage = make_storage(seeded.bucket, seeded.root, concurrency=4)
    read, alive, peak = storage.read, 0, 0

    async def counted(key: str, limit: int) -> bytes:
        nonlocal alive, peak
        alive += 1
        peak = max(peak, alive)
        try:
            return await read(key, limit)
        finally:
            alive -= 1

    storage.read = counted  # type: ignore[method-assign]
    hexes_read = sorted(seeded.blobs)[:300]
    keys = [layout.blob_data(h) for h in hexes_read] + ["repositories/none"]
    found = await asyncio.gather(storage.read_many(keys, 100), storage.read_many(keys[:5], 100))
    assert found[0] == [seeded.blobs[h] for h in hexes_read] + [None]
    assert found[1] == found[0][:5]
    assert 4 < peak <= 4 + 4  # each call keeps its own four, whatever the other does
    assert await storage.read_many([], 100) == []


@session_loop
async def test_scan_lists_layer_links_only_when_asked(
    seeded: Seeded, make_storage: MakeStorage, proxy: FaultProxy
) -> None:
    counted = make_storage(seeded.bucket, seeded.root, endpoint=proxy.url)

    async def scan(layers: bool) -> list[str]:
        proxy.reset_counts()
        return [k async for batch in counted.scan_repositories(layers=layers) for k in batch]

    assert sorted(await scan(True)) == sorted(seeded.repo_keys)
    without = await scan(False)
    repos = {f"repositories/ns{n % 5}/app{n}/" for n in range(24)}
    expected = {k for k in seeded.repo_keys if "/_layers/" not in k}
    assert sorted(without) == sorted(expected | {f"{repo}_layers/" for repo in repos})
    listed = [unquote(s.path_qs) for s in proxy.seen]
    assert not [path for path in listed if "/_layers/sha256" in path or path.endswith("_layers/")]
    # repositories/, 5 namespaces, 24 repositories by delimiter; then each _manifests/ flat
    assert proxy.requests == 1 + 5 + 24 + 24
    # the inventory still knows a repository whose only section went unlisted
    inventory = Inventory(keep_layers=False)
    inventory.add_keys([*without, "repositories/only-layers/_layers/"])
    assert set(inventory.repositories) == {r[13:-1] for r in repos} | {"only-layers"}
    assert inventory.unknown == 1  # repositories/stray-file


@pytest.fixture(scope="module")
def tls_weed() -> Iterator[SeaweedFS]:
    with SeaweedFS(tls=True) as server:
        yield server


@session_loop
async def test_https_with_cabundle_and_the_default_credential_chain(
    tls_weed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = new_bucket(tls_weed)
    # as a registry config would say it: no keys (the environment has them), a CA bundle
    config = tmp_path / "config.yml"
    s3 = {"bucket": bucket, "region": tls_weed.region}
    s3 |= {"regionendpoint": tls_weed.https_endpoint, "forcepathstyle": True}
    trusted = {**s3, "cabundle": str(tls_weed.ca_bundle)}
    config.write_text(yaml.safe_dump({"storage": {"s3": trusted}}))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", tls_weed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", tls_weed.secret_key)
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)  # only cabundle can make it trusted
    settings = load_settings(config, env={})
    assert settings.storage.s3 is not None and settings.storage.s3.accesskey is None
    storage = S3Storage(settings.storage, 4, FAST)
    try:
        blob = layout.blob_data("ab" * 32)
        await storage.write(blob, b"over tls")
        await storage.probe()
        assert await storage.read(blob, 100) == b"over tls"  # our own signed GET
        assert [b.hex for b in await storage.list_blob_shard("ab")] == ["ab" * 32]
        assert await storage.delete_blobs(["ab" * 32]) == []
        assert await storage.stat(blob) is None
    finally:
        await storage.close()
    # the same server without the bundle: a clear certificate error, at once (not retried)
    config.write_text(yaml.safe_dump({"storage": {"s3": s3}}))
    untrusted = S3Storage(load_settings(config, env={}).storage, 4, FAST)
    started = time.monotonic()
    try:
        with pytest.raises(StorageError, match=r"(?i)certificate verify failed"):
            await untrusted.probe()
    finally:
        await untrusted.close()
    assert time.monotonic() - started < 5


# -- deletes ----------------------------------------------------------------------------


@session_loop
async def test_delete_blobs_in_batches(
    weed: SeaweedFS, make_storage: MakeStorage, proxy: FaultProxy
) -> None:
    bucket = new_bucket(weed)
    doomed = hexes(2 * BATCH + 150, seed=7)
    kept = hexes(20, seed=8)
    root = "root/docker/registry/v2/"
    await weed.seed(bucket, {root + layout.blob_data(h): b"b" for h in doomed + kept})

    storage = make_storage(bucket, "root", endpoint=proxy.url)
    proxy.reset_counts()
    assert await storage.delete_blobs(doomed) == []
    posts = [seen for seen in proxy.seen if seen.method == "POST"]
    # split into parallel streams, never more than 1000 keys a request
    assert len(posts) >= 3
    asked = {f"root/docker/registry/v2/{layout.blob_data(h)}" for h in doomed}
    sent: list[str] = []
    for seen in posts:
        keys = delete_request_keys(seen.body)
        assert 0 < len(keys) <= BATCH
        sent.extend(keys)
        # Content-MD5 for stores that require it, signed along with the rest
        assert (
            seen.headers["Content-MD5"]
            == base64.b64encode(hashlib.md5(seen.body).digest()).decode()
        )
        assert "content-md5" in seen.headers["Authorization"]
        assert b"<Quiet>true</Quiet>" in seen.body
    assert sorted(sent) == sorted(asked)
    assert weed.keys(bucket) == sorted(
        f"root/docker/registry/v2/{layout.blob_data(h)}" for h in kept
    )


@session_loop
async def test_delete_tree(weed: SeaweedFS, make_storage: MakeStorage) -> None:
    bucket = new_bucket(weed)
    storage = make_storage(bucket, "r")
    items = {f"repositories/ns/app/_uploads/u{n}/data": b"u" for n in range(1500)}
    items |= {f"repositories/ns/app/_layers/sha256/{h}/link": b"l" for h in hexes(5)}
    items |= {"repositories/ns/apple/_layers/sha256/x/link": b"k", "repositories/ns/f": b"k"}
    # more than one listing page: the keys of every page go
    await weed.seed(bucket, {storage.prefix + key: value for key, value in items.items()})
    assert await storage.delete_tree("repositories/ns/app/") == []
    left = sorted(e.key for e in await walk_keys(storage, "repositories/"))
    assert left == ["repositories/ns/apple/_layers/sha256/x/link", "repositories/ns/f"]
    files, _ = await storage.list_dir("repositories/ns/app/")
    assert files == []
    assert await storage.delete_tree("repositories/ns/app") == []


@session_loop
async def test_delete_reports_per_key_errors(weed: SeaweedFS, make_storage: MakeStorage) -> None:
    bucket = new_bucket(weed)
    writer = make_storage(bucket)
    keys = [f"repositories/r/_uploads/u{n}/data" for n in range(5)]
    await put_all(writer, dict.fromkeys(keys, b"x"))
    reader = make_storage(bucket, reader=True)  # SeaweedFS: 200 with an <Error> per key
    failures = await reader.delete_keys(keys)
    assert sorted(f.key for f in failures) == keys
    assert all("AccessDenied" in f.reason for f in failures)
    assert sorted(e.key for e in await walk_keys(writer, "repositories/")) == keys


# -- probe ------------------------------------------------------------------------------


@session_loop
async def test_probe_errors(weed: SeaweedFS, make_storage: MakeStorage, seeded: Seeded) -> None:
    await make_storage(seeded.bucket, seeded.root).probe()

    missing = make_storage("no-such-bucket-here")
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket-here' does not exist at http"):
        await missing.probe()

    with pytest.raises(StorageError, match=r"no registry data.*'wrong/root/docker/registry/v2/'"):
        await make_storage(seeded.bucket, "wrong/root").probe()
    with pytest.raises(StorageError, match="no registry data"):
        await make_storage(new_bucket(weed)).probe()

    bad_key = S3Storage(
        StorageSettings(
            "s3",
            seeded.root,
            S3Settings(seeded.bucket, regionendpoint=weed.endpoint, accesskey="x", secretkey="y"),
        ),
        2,
        FAST,
    )
    async with bad_key:
        with pytest.raises(StorageError, match="denied"):
            await bad_key.probe()

    port = _closed_port()
    closed = make_storage(seeded.bucket, endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError, match=rf"127\.0\.0\.1:{port}.*after 5 attempts"):
        await closed.probe()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- faults -----------------------------------------------------------------------------


@session_loop
async def test_listing_survives_faults(
    seeded: Seeded, make_storage: MakeStorage, proxy: FaultProxy
) -> None:
    retry = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.05, read_timeout=0.5)
    storage = make_storage(seeded.bucket, seeded.root, endpoint=proxy.url, retry=retry)

    def next_page(request: web.Request) -> bool:
        return is_list(request) and "continuation-token" in request.query

    # each page is retried on its own: four faults on the first, three on the second
    proxy.inject("slowdown", 2, match=next_page)
    proxy.inject("internal", 1, match=next_page)
    proxy.inject("slowdown", 1, match=is_list)
    proxy.inject("internal", 1, match=is_list)
    proxy.inject("reset", 1, match=is_list)
    proxy.inject("delay", 1, match=is_list, delay=1.0)  # beyond the read timeout
    shard = await storage.list_blob_shard(seeded.shard)
    assert {b.hex for b in shard} == set(seeded.blobs)
    assert proxy.injected == {"slowdown": 3, "internal": 2, "reset": 1, "delay": 1}

    def child(request: web.Request) -> bool:
        return is_list(request) and "delimiter" not in request.query

    # the top-level delimiter listing and the concurrent per-namespace listings
    proxy.reset_counts()
    proxy.inject("internal", 2, match=lambda r: is_list(r) and not child(r))
    proxy.inject("slowdown", 2, match=child)
    proxy.inject("reset", 1, match=child)
    proxy.inject("internal", 1, match=child)
    walked = await walk_keys(storage, "repositories/")
    assert sorted(e.key for e in walked) == sorted(seeded.repo_keys)
    assert proxy.injected == {"internal": 3, "slowdown": 2, "reset": 1}


@session_loop
async def test_fault_outlasting_retries_fails_closed(
    seeded: Seeded, make_storage: MakeStorage, proxy: FaultProxy
) -> None:
    storage = make_storage(seeded.bucket, seeded.root, endpoint=proxy.url)
    proxy.inject("slowdown", None, match=is_list)
    with pytest.raises(StorageError, match=r"after 5 attempts: SlowDown") as caught:
        await storage.list_blob_shard(seeded.shard)
    assert isinstance(caught.value.__cause__, ClientError)
    assert proxy.requests == 5
    with pytest.raises(StorageError, match="SlowDown"):
        await walk_keys(storage, "repositories/")
    proxy.clear()
    proxy.inject("internal", None)
    with pytest.raises(StorageError, match="InternalError"):
        await storage.read(f"repositories/{next(iter(seeded.repo_keys))}", 100)
    with pytest.raises(StorageError):
        await storage.probe()


@session_loop
async def test_delete_under_faults(
    weed: SeaweedFS, make_storage: MakeStorage, proxy: FaultProxy
) -> None:
    bucket = new_bucket(weed)
    doomed = hexes(BATCH + 300, seed=21)
    kept = hexes(200, seed=22)
    root = "r/docker/registry/v2/"
    await weed.seed(bucket, {root + layout.blob_data(h): b"d" for h in doomed + kept})
    storage = make_storage(bucket, "r", endpoint=proxy.url)

    # transient faults, including a reset after the store already deleted: all retried
    proxy.inject("internal", 2, match=is_delete_objects)
    proxy.inject("reset_after", 1, match=is_delete_objects)
    proxy.inject("slowdown", 1, match=is_delete_objects)
    proxy.inject("delete_errors", 1, code="InternalError")  # per key, retried per key
    first, rest = doomed[:1100], doomed[1100:]  # two batches under faults, then 200
    assert await storage.delete_blobs(first) == []
    assert sum(proxy.injected.values()) == 5

    # a fault that outlasts the retries: every key of the batch reported, nothing deleted
    proxy.inject("slowdown", None, match=is_delete_objects)
    failures = await storage.delete_blobs(rest)
    assert sorted(f.key for f in failures) == sorted(rest)  # named by digest
    assert all("SlowDown" in f.reason for f in failures)
    proxy.clear()
    proxy.inject("delete_errors", None, code="AccessDenied")
    failures = await storage.delete_blobs(rest[:10])
    assert [f.reason for f in failures] == ["AccessDenied: injected by faultproxy"] * 10
    proxy.clear()

    remaining = set(weed.keys(bucket))
    assert remaining == {root + layout.blob_data(h) for h in rest + kept}
    # the driver never asked to delete anything it was not given
    asked = {root + layout.blob_data(h) for h in doomed}
    for seen in proxy.seen:
        if seen.method == "POST":
            assert set(delete_request_keys(seen.body)) <= asked


@session_loop
async def test_delete_errors_in_another_form_or_for_unsent_keys(
    weed: SeaweedFS, make_storage: MakeStorage, proxy: FaultProxy
) -> None:
    bucket = new_bucket(weed)
    doomed = hexes(6, seed=31)
    root = "r/docker/registry/v2/"
    await weed.seed(bucket, {root + layout.blob_data(h): b"d" for h in doomed})
    storage = make_storage(bucket, "r", endpoint=proxy.url)
    # the store refuses every key, but echoes it re-encoded: still a failure of that key
    echoes = {
        "url-encoded": lambda key: quote(key, safe=""),
        "leading slash": lambda key: "/" + key,
        "both": lambda key: "/" + quote(key, safe=""),
    }
    try:
        for name, form in echoes.items():
            proxy.inject("delete_errors", 1, code="AccessDenied", key_form=form)
            failures = await storage.delete_blobs(doomed)
            assert sorted(f.key for f in failures) == doomed, name
            assert {f.reason for f in failures} == {"AccessDenied: injected by faultproxy"}
        # an error naming a key that was not sent: which key stayed is unknown, so all did
        proxy.inject("delete_errors", 1, code="AccessDenied", key_form=lambda key: key + ".unsent")
        failures = await storage.delete_blobs(doomed)
        assert sorted(f.key for f in failures) == doomed
        assert all("a key it was not sent" in f.reason for f in failures)
    finally:
        proxy.clear()
    assert set(weed.keys(bucket)) == {root + layout.blob_data(h) for h in doomed}


@session_loop
async def test_move_copies_in_parts_above_the_copy_limit(
    weed: SeaweedFS, make_storage: MakeStorage, proxy: FaultProxy
) -> None:
    """CopyObject refuses sources over 5 GiB: above ``copy_limit`` a move copies in parts
    (here a 5 MiB limit and a 12 MiB object: parts of 5, 5 and 2 MiB)."""
    bucket = new_bucket(weed)
    storage = make_storage(bucket, "r", endpoint=proxy.url)
    storage.copy_limit = storage.copy_part_size = 5 * 1024**2
    big, small = hexes(2, seed=31)
    data = random.Random(31).randbytes(12 * 1024**2)
    await storage.write(layout.blob_data(big), data)
    await storage.write(layout.blob_data(small), b"small")
    proxy.reset_counts()
    assert await storage.move(layout.blob_data(big), "parked/big")
    assert await storage.move(layout.blob_data(small), "parked/small")
    assert not await storage.move(layout.blob_data(big), "parked/again")  # gone: False
    assert await storage.read("parked/big", len(data)) == data
    assert await storage.read("parked/small", 5) == b"small"
    assert await storage.stat(layout.blob_data(big)) is None
    copies = [s for s in proxy.seen if s.method == "PUT" and "x-amz-copy-source" in s.headers]
    ranges = sorted(s.headers.get("x-amz-copy-source-range", "") for s in copies)
    mib = 1024**2
    assert ranges == [
        "",  # the small one: one CopyObject
        f"bytes=0-{5 * mib - 1}",
        f"bytes={10 * mib}-{12 * mib - 1}",
        f"bytes={5 * mib}-{10 * mib - 1}",
    ]

    # a part failing past the retries: the upload is aborted, the source stays whole
    proxy.inject("internal", None, match=lambda r: "partNumber" in r.query)
    with pytest.raises(StorageError, match="InternalError"):
        await storage.move("parked/big", "parked/other")
    proxy.clear()
    assert await storage.read("parked/big", len(data)) == data
    assert await storage.stat("parked/other") is None
    uploads = weed.client().list_multipart_uploads(Bucket=bucket)
    assert not uploads.get("Uploads"), uploads


@session_loop
async def test_conditional_writes_and_the_lease(
    weed: SeaweedFS, make_storage: MakeStorage, proxy: FaultProxy
) -> None:
    """SeaweedFS honours If-None-Match and If-Match on PutObject: the lease uses them; a
    store that ignores them gets write, settle, read."""
    from daemon.lease import KEY, Lease, LeaseHeld

    bucket = new_bucket(weed)
    storage = make_storage(bucket, "r")
    assert await storage.conditional_writes()
    key = "_registry-pruned/cas"
    first = await storage.write_if(key, b"one", None)
    with pytest.raises(Conflict):
        await storage.write_if(key, b"two", None)  # exists
    with pytest.raises(Conflict):
        await storage.write_if(key, b"two", '"0123456789abcdef0123456789abcdef"')
    second = await storage.write_if(key, b"two", first)
    assert await storage.read_versioned(key, 10) == (b"two", second)
    with pytest.raises(Conflict):
        await storage.write_if(key, b"three", first)  # stale version
    with pytest.raises(NotFound):
        await storage.read_versioned("_registry-pruned/none", 10)

    leases = [Lease(make_storage(bucket, "r"), f"run{i}") for i in range(6)]
    results = await asyncio.gather(*(lease.acquire() for lease in leases), return_exceptions=True)
    assert [r is None for r in results].count(True) == 1, results
    assert all(isinstance(r, LeaseHeld) for r in results if r is not None)
    assert all(lease.atomic for lease in leases)
    for lease in leases:
        await lease.release()

    proxy.inject("ignore_conditions", None)
    ignoring = make_storage(bucket, "r", endpoint=proxy.url)
    assert not await ignoring.conditional_writes()
    lease = Lease(ignoring, "fallback")
    await lease.acquire()
    assert not lease.atomic and lease.settled >= 0.5
    assert lease.held()
    await lease.release()
    proxy.clear()
    conditional = [s for s in proxy.seen if {"If-None-Match", "If-Match"} & set(s.headers)]
    assert len(conditional) == 2  # the two probes; the fallback lease writes plainly
    assert weed.keys(bucket) == [f"r/docker/registry/v2/{key}"]  # no lease or probe left
    assert KEY.startswith("_registry-pruned/")


@session_loop
async def test_grace_follows_the_stores_clock(weed: SeaweedFS, make_storage: MakeStorage) -> None:
    """S3 stamps LastModified with its own clock. This host's clock two hours ahead of the
    store's makes blobs written a moment ago look two hours old: the grace period must
    count in the store's time, which the probe reads from the Date header."""
    from daemon.logs import make_logger
    from daemon.progress import Progress
    from daemon.prune import CHECK, Engine, RunOptions
    from daemon.sources.storage import StorageSource

    bucket = new_bucket(weed)
    fresh = hexes(5, seed=41)  # orphans written just now
    await weed.seed(bucket, {"r/docker/registry/v2/" + layout.blob_data(h): b"x" for h in fresh})
    log = make_logger("error")

    async def check(grace: float, ahead: float) -> Engine:
        storage = make_storage(bucket, "r")
        engine = Engine(
            storage,
            StorageSource(4, log),
            RunOptions(mode=CHECK, grace=grace),
            Progress(),
            log=log,
            clock=lambda: time.time() + ahead,
        )
        await engine.run()
        return engine

    # clocks that agree: the Date header's whole second is no skew, and blobs written a
    # moment ago are candidates to a grace=0 check (as for garbage-collect)
    engine = await check(grace=0, ahead=0)
    assert engine.store_skew == 0.0
    assert (engine.summary.blobs, engine.summary.too_young) == (5, 0)
    engine = await check(grace=3600, ahead=7200)
    assert -7202 <= engine.store_skew <= -7199, engine.store_skew
    assert (engine.summary.blobs, engine.summary.too_young) == (0, 5)
    # the same blobs are candidates once older than the grace period in the store's time
    # (the Date header has whole seconds: the store's now is known to within one, erring
    # early, so blobs written within that second would still count as too young)
    await asyncio.sleep(2)
    engine = await check(grace=0, ahead=7200)
    assert (engine.summary.blobs, engine.summary.too_young) == (5, 0)
    # a store ahead of this host: this host's cutoff is the earlier one, and counts
    engine = await check(grace=3600, ahead=-7200)
    assert 7199 <= engine.store_skew <= 7202, engine.store_skew
    assert engine.cutoff <= time.time() - 7200 - 3600 + 5
    assert (engine.summary.blobs, engine.summary.too_young) == (0, 5)
