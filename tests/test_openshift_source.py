"""OpenShiftSource against the fake OpenShift API, reached through a kubeconfig."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from daemon.inventory import Inventory
from daemon.progress import Progress
from daemon.sources.base import Marks, ReadOnlyRefused, SourceError
from daemon.sources.openshift import OpenShiftSource, create
from tests.harness.fake_openshift import (
    OCI_INDEX,
    OCI_MANIFEST,
    SCHEMA1,
    FakeCluster,
    FakeOpenShift,
    fake_digest,
    make_image,
    make_image_stream,
    make_manifest_list,
    make_registry_deployment,
)

pytestmark = pytest.mark.asyncio(loop_scope="function")


def raw(digest: str) -> bytes:
    return bytes.fromhex(digest.removeprefix("sha256:"))


def raws(digests: Iterable[str]) -> set[bytes]:
    return {raw(d) for d in digests}


def inventory(repos: dict[str, Iterable[str]]) -> Inventory:
    """An inventory whose repositories hold these revision digests."""
    inv = Inventory()
    for name, revisions in repos.items():
        inv.repo(name).revisions.update(d.removeprefix("sha256:") for d in revisions)
    return inv


@pytest_asyncio.fixture(loop_scope="function")
async def fake() -> AsyncIterator[FakeOpenShift]:
    async with FakeOpenShift(FakeCluster(bookmark_interval=0.2)) as server:
        yield server


@pytest.fixture
def kubeconfig(fake: FakeOpenShift, tmp_path: Path) -> str:
    return str(fake.write_kubeconfig(tmp_path / "kubeconfig"))


@pytest_asyncio.fixture(loop_scope="function")
async def opened(kubeconfig: str) -> AsyncIterator[list[OpenShiftSource]]:
    """Sources a test creates through ``source()``, closed afterwards."""
    sources: list[OpenShiftSource] = []
    yield sources
    for src in sources:
        await src.close()


@pytest.fixture
def source(kubeconfig: str, opened: list[OpenShiftSource]) -> Any:
    async def make(**options: Any) -> OpenShiftSource:
        options.setdefault("watch_retry_delay", 0.05)
        src = await create(kubeconfig, **options)
        opened.append(src)
        return src

    return make


async def mark(
    src: OpenShiftSource, inv: Inventory | None = None, progress: Progress | None = None
) -> Marks:
    return await src.mark(inv or Inventory(), None, progress or Progress())  # type: ignore[arg-type]


def list_requests(cluster: FakeCluster, path_end: str = "/images") -> list[dict[str, str]]:
    return [
        q
        for m, p, q in cluster.requests
        if p.endswith(path_end) and "watch" not in q and m == "GET"
    ]


# -- the in-use set ---------------------------------------------------------------------------


async def test_in_use_from_images(fake: FakeOpenShift, source: Any) -> None:
    c = fake.cluster
    d = fake_digest
    c.add_image(make_image(d("s2"), layers=[d("base"), d("s2-l")], config=d("s2-cfg")))
    c.add_image(
        make_image(
            d("oci"), layers=[d("base"), d("oci-l")], config=d("oci-cfg"), media_type=OCI_MANIFEST
        )
    )
    # schema1: dockerImageMetadata.Id is a v1 image id, not a blob
    c.add_image(make_image(d("s1"), layers=[d("s1-l")], config=d("s1-v1")[7:], media_type=SCHEMA1))
    c.add_image(make_image(d("amd"), layers=[d("amd-l")], config=d("amd-cfg")))
    # a list whose arm64 child has no Image object: the child's digest still counts
    c.add_image(make_manifest_list(d("list"), [d("amd"), (d("arm"), "arm64")]))
    c.add_image(make_manifest_list(d("index"), [d("amd")], media_type=OCI_INDEX))
    progress = Progress()
    marks = await mark(await source(), progress=progress)
    expected = [
        "s2", "base", "s2-l", "s2-cfg", "oci", "oci-l", "oci-cfg", "s1", "s1-l",
        "amd", "amd-l", "amd-cfg", "list", "arm", "index",
    ]  # fmt: skip
    assert marks.in_use == raws(d(x) for x in expected)
    assert raw(d("s1-v1")) not in marks.in_use
    assert progress.manifests == 6
    assert marks.remove_repositories == [] and marks.remove_revisions == []


async def test_paging_small_pages(fake: FakeOpenShift, source: Any) -> None:
    names = [fake_digest(f"img{i}") for i in range(25)]
    for i, name in enumerate(names):
        fake.cluster.add_image(
            make_image(name, layers=[fake_digest(f"l{i}")], config=fake_digest(i))
        )
    progress = Progress()
    marks = await mark(await source(page_size=2), progress=progress)
    assert raws(names) <= marks.in_use
    assert len(marks.in_use) == 75
    requests = list_requests(fake.cluster)
    assert len(requests) == 13
    assert all(q["limit"] == "2" for q in requests)
    assert "continue" not in requests[0] and all("continue" in q for q in requests[1:])
    assert progress.manifests == 25


async def test_invalid_config_digest_of_schema2_fails(fake: FakeOpenShift, source: Any) -> None:
    fake.cluster.add_image(make_image(fake_digest("x"), layers=[fake_digest("l")], config=None))
    with pytest.raises(SourceError, match=r"dockerImageMetadata\.Id"):
        await mark(await source())


async def test_bad_layer_digest_fails(fake: FakeOpenShift, source: Any) -> None:
    fake.cluster.add_image(
        make_image(fake_digest("x"), layers=["sha256:NOPE"], config=fake_digest(1))
    )
    with pytest.raises(SourceError, match="dockerImageLayers"):
        await mark(await source())


# -- listing faults ---------------------------------------------------------------------------


def seven_images(cluster: FakeCluster) -> list[str]:
    names = [fake_digest(f"img{i}") for i in range(7)]
    for name in names:
        cluster.add_image(make_image(name, config=fake_digest(f"cfg-{name}")))
    return names


async def test_expired_continue_restarts(fake: FakeOpenShift, source: Any) -> None:
    names = seven_images(fake.cluster)
    fake.cluster.expire_continue("images", page=3, times=1)
    progress = Progress()
    marks = await mark(await source(page_size=2), progress=progress)
    assert raws(names) <= marks.in_use
    fresh = [q for q in list_requests(fake.cluster) if "continue" not in q]
    assert len(fresh) == 2  # the listing started over once
    assert progress.manifests == 7  # the abandoned pages are not counted twice


async def test_expired_beyond_bound_fails(fake: FakeOpenShift, source: Any) -> None:
    seven_images(fake.cluster)
    fake.cluster.expire_continue("images", page=2, times=None)
    with pytest.raises(SourceError, match="expired"):
        await mark(await source(page_size=2, list_restarts=2))
    fresh = [q for q in list_requests(fake.cluster) if "continue" not in q]
    assert len(fresh) == 3


async def test_expired_stream_listing_restarts(fake: FakeOpenShift, source: Any) -> None:
    a = fake_digest("a")
    fake.cluster.add_image(make_image(a, config=fake_digest("c")))
    for i in range(5):
        fake.cluster.add_stream(make_image_stream(f"ns{i}", "app", {"latest": [a]}))
    fake.cluster.expire_continue("imagestreams", page=2, times=1)
    repos = {f"ns{i}/app": [a] for i in range(5)}
    marks = await mark(await source(page_size=2), inventory(repos))
    assert marks.remove_repositories == [] and marks.remove_revisions == []


@pytest.mark.parametrize("resource", ["images", "imagestreams"])
async def test_repeated_continue_token_fails_closed(
    fake: FakeOpenShift, source: Any, resource: str
) -> None:
    """A page that hands back the token it was asked with would be followed forever."""
    names = seven_images(fake.cluster)
    for i in range(5):
        fake.cluster.add_stream(make_image_stream(f"ns{i}", "app", {"latest": [names[0]]}))
    fake.cluster.repeat_continue(resource, page=2, times=None)
    repos = {f"ns{i}/app": [names[0]] for i in range(5)}
    with pytest.raises(SourceError, match="continue token it had already given"):
        async with asyncio.timeout(20):  # without the guard: the same page, forever
            await mark(await source(page_size=2), inventory(repos))
    path_end = "/images" if resource == "images" else "/imagestreams"
    pages = [q for q in list_requests(fake.cluster, path_end) if "continue" in q]
    assert len(pages) == 1  # page 2 named its own token again: never followed


async def test_server_error_mid_list(fake: FakeOpenShift, source: Any) -> None:
    seven_images(fake.cluster)
    fake.cluster.fail("images", page=2, status=500)
    with pytest.raises(SourceError, match="HTTP 500"):
        await mark(await source(page_size=2))


@pytest.mark.parametrize(
    ("resource", "permission"),
    [
        ("images", "list images.image.openshift.io"),
        ("imagestreams", "list imagestreams.image.openshift.io"),
    ],
)
async def test_forbidden_names_permission(
    fake: FakeOpenShift, source: Any, resource: str, permission: str
) -> None:
    fake.cluster.add_stream(make_image_stream("ns", "app"))
    fake.cluster.forbid(resource)
    with pytest.raises(SourceError, match="403") as info:
        await mark(await source(), inventory({"ns/app": []}))
    assert permission in str(info.value)
    assert "is forbidden" in str(info.value)


async def test_rbac_table_applies_to_the_source(fake: FakeOpenShift, source: Any) -> None:
    fake.cluster.rbac = True
    fake.cluster.allow("system:serviceaccount:openshift-image-registry:pruner", "list", "*")
    fake.cluster.add_stream(make_image_stream("ns", "app"))
    await mark(await source(), inventory({"ns/app": []}))
    with pytest.raises(SourceError, match=r"get configs\.imageregistry\.operator\.openshift\.io"):
        await (await source()).registry_read_only()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (None, "malformed JSON"),
        (b'{"kind":"ImageList","metadata":{},"items":{}}', "not a list"),
        (b'{"kind":"ImageList","metadata":{}}', "no items"),
        (b"[1, 2]", "not an object"),
        (b'{"metadata":{},"items":[{"metadata":{"name":7}}]}', "not a digest"),
    ],
)
async def test_malformed_answers_fail(
    fake: FakeOpenShift, source: Any, body: bytes | None, message: str
) -> None:
    seven_images(fake.cluster)
    fake.cluster.malformed("images", page=2, body=body)
    with pytest.raises(SourceError, match=message):
        await mark(await source(page_size=2))


async def test_slow_page_times_out(fake: FakeOpenShift, source: Any) -> None:
    seven_images(fake.cluster)
    fake.cluster.slow("images", page=2, delay=5)
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"no answer within 0\.5s"):
        await mark(await source(page_size=2, request_timeout=0.5))
    assert time.monotonic() - started < 3


async def test_wrong_token_is_401(fake: FakeOpenShift, tmp_path: Path) -> None:
    config = fake.write_kubeconfig(tmp_path / "bad", token="not-a-token")
    src = await create(str(config))
    try:
        with pytest.raises(SourceError, match="401 Unauthorized"):
            await mark(src)
    finally:
        await src.close()


async def test_unreachable_api_fails(tmp_path: Path) -> None:
    async with FakeOpenShift() as gone:
        config = gone.write_kubeconfig(tmp_path / "kc")
    src = await create(str(config), request_timeout=2)
    try:
        with pytest.raises(SourceError, match="listing images"):
            await mark(src)
    finally:
        await src.close()


async def test_bad_configuration_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SourceError, match="kubeconfig"):
        await create(str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(SourceError, match="in-cluster"):
        await create(None)


# -- repositories ---------------------------------------------------------------------------


async def test_repository_rules(fake: FakeOpenShift, source: Any) -> None:
    c, d = fake.cluster, fake_digest
    for name in ("tagged", "old", "untracked", "amd", "arm", "stray"):
        c.add_image(make_image(d(name), layers=[d(f"{name}-l")], config=d(f"{name}-c")))
    c.add_image(make_manifest_list(d("list"), [d("amd"), (d("arm"), "arm64")]))
    c.add_image(make_manifest_list(d("other-list"), [d("stray")]))
    c.add_stream(
        make_image_stream("ns", "app", {"latest": [d("tagged"), d("old")], "multi": [d("list")]})
    )
    c.add_stream(make_image_stream("ns", "empty"))
    c.add_stream(make_image_stream("other", "app", {"v1": [d("deleted")]}))
    inv = inventory(
        {
            "ns/app": [
                d("tagged"),  # in tag history: stays
                d("old"),  # older tag history item: stays
                d("untracked"),  # image exists, stream does not name it: unlinked
                d("deleted"),  # no such image: unlinked
                d("list"),  # named manifest list: stays
                d("amd"),  # children of the named list: stay, pullable by digest
                d("arm"),
                d("stray"),  # child of a list the stream does not name: unlinked
            ],
            "ns/empty": [d("tagged")],
            "other/app": [d("deleted")],  # stream names an image that is gone: unlinked
            "ns/gone": [d("tagged")],  # no ImageStream: removed whole
            "a/b/c": [d("tagged")],  # cannot be an image stream
            "my_ns/app": [],  # '_' is not allowed in a namespace
            "single": [],
        }
    )
    progress = Progress()
    marks = await mark(await source(page_size=2), inv, progress)
    assert sorted(marks.remove_repositories) == ["a/b/c", "my_ns/app", "ns/gone", "single"]
    assert sorted(marks.remove_revisions) == sorted(
        [
            ("ns/app", d("untracked")[7:]),
            ("ns/app", d("deleted")[7:]),
            ("ns/app", d("stray")[7:]),
            ("ns/empty", d("tagged")[7:]),
            ("other/app", d("deleted")[7:]),
        ]
    )
    assert len(marks.notes) == 3
    assert any("a/b/c" in note for note in marks.notes)
    assert progress.repositories == 7
    # blobs follow images, not streams: every image's blobs stay
    assert raws([d("untracked"), d("untracked-l"), d("stray-c")]) <= marks.in_use


async def test_repositories_now_in_use_reads_each_stream(fake: FakeOpenShift, source: Any) -> None:
    fake.cluster.add_stream(make_image_stream("ns", "app"))
    src = await source()
    names = ["ns/app", "ns/gone", "a/b/c"]
    assert await src.repositories_now_in_use(names) == {"ns/app"}
    fetched = [p for m, p, _q in fake.cluster.requests if "/namespaces/" in p]
    assert fetched == [
        "/apis/image.openshift.io/v1/namespaces/ns/imagestreams/app",
        "/apis/image.openshift.io/v1/namespaces/ns/imagestreams/gone",
    ]  # a/b/c cannot be a stream: not asked
    fake.cluster.fail("imagestream", status=500)
    with pytest.raises(SourceError, match="HTTP 500"):
        await src.repositories_now_in_use(["ns/gone"])
    fake.cluster.forbid("imagestream")
    with pytest.raises(SourceError, match=r"get imagestreams\.image\.openshift\.io"):
        await src.repositories_now_in_use(["ns/app"])


# -- read-only guard ----------------------------------------------------------------------


async def test_registry_read_only(fake: FakeOpenShift, source: Any) -> None:
    src = await source()
    fake.cluster.read_only = True
    assert await src.registry_read_only() is True
    fake.cluster.read_only = False
    assert await src.registry_read_only() is False
    fake.cluster.read_only = None  # spec without readOnly: the default, writable
    assert await src.registry_read_only() is False


ROLLING = {
    "generation not observed": (
        {"generation": 4, "observed_generation": 3},
        "has generation 4, its controller has seen only 3",
    ),
    "pods not all updated": ({"updated_replicas": 1}, "1 of 2 replicas updated"),
    "old pods still running": ({"running_replicas": 3}, "3 running (old pods included)"),
    "no read-only variable": ({"env": []}, "without REGISTRY_STORAGE_MAINTENANCE_READONLY"),
    "read-only disabled": (
        {"env": [{"name": "REGISTRY_STORAGE_MAINTENANCE_READONLY", "value": "{enabled: false}"}]},
        "does not enable read-only mode",
    ),
    "one of two disabled": (
        {
            "env": [
                {"name": "REGISTRY_STORAGE_MAINTENANCE_READONLY", "value": '{"enabled": true}'},
                {"name": "REGISTRY_STORAGE_MAINTENANCE_READONLY_ENABLED", "value": "false"},
            ]
        },
        "_ENABLED to 'false'",
    ),
    "from a secret": (
        {
            "env": [
                {
                    "name": "REGISTRY_STORAGE_MAINTENANCE_READONLY",
                    "valueFrom": {"configMapKeyRef": {"name": "x", "key": "y"}},
                }
            ]
        },
        "from a reference",
    ),
}


@pytest.mark.parametrize("case", sorted(ROLLING))
async def test_read_only_needs_the_registry_rolled_out(
    fake: FakeOpenShift, source: Any, case: str
) -> None:
    """spec.readOnly alone is not enough: until the operator's rollout ends, old registry
    pods still accept pushes."""
    changes, reason = ROLLING[case]
    fake.cluster.read_only = True
    fake.cluster.deployment = make_registry_deployment(read_only=True, **changes)
    with pytest.raises(ReadOnlyRefused, match=re.escape(reason)):
        await (await source()).registry_read_only()
    asked = [p for _m, p, _q in fake.cluster.requests if "/deployments/" in p]
    assert asked == ["/apis/apps/v1/namespaces/openshift-image-registry/deployments/image-registry"]


async def test_read_only_when_rolled_out(fake: FakeOpenShift, source: Any) -> None:
    fake.cluster.read_only = True
    src = await source()
    for env in ('{"enabled": true}', "{enabled: true}", "true"):
        fake.cluster.deployment = make_registry_deployment(
            read_only=True, env=[{"name": "REGISTRY_STORAGE_MAINTENANCE_READONLY", "value": env}]
        )
        assert await src.registry_read_only() is True
    fake.cluster.deployment = make_registry_deployment(read_only=True, replicas=1)
    del fake.cluster.deployment["spec"]["replicas"]  # the API's default: 1
    assert await src.registry_read_only() is True
    fake.cluster.forbid("deployments")
    with pytest.raises(SourceError, match=r"get deployments\.apps in openshift-image-registry"):
        await src.registry_read_only()


@pytest.mark.parametrize(("status", "message"), [(403, "403 Forbidden"), (500, "HTTP 500")])
async def test_registry_read_only_errors(
    fake: FakeOpenShift, source: Any, status: int, message: str
) -> None:
    fake.cluster.fail("configs", status=status)
    with pytest.raises(SourceError, match=message):
        await (await source()).registry_read_only()


# -- online mode --------------------------------------------------------------------------


async def wait_seen(src: OpenShiftSource, digests: set[bytes]) -> set[bytes]:
    async with asyncio.timeout(5):
        while True:
            seen = await src.newly_in_use(digests)
            if seen == digests:
                return seen
            await asyncio.sleep(0.02)


async def test_online_watch_sees_new_image(fake: FakeOpenShift, source: Any) -> None:
    c, d = fake.cluster, fake_digest
    c.add_image(make_image(d("old"), layers=[d("old-l")], config=d("old-c")))
    src = await source()
    await mark(src)
    await src.start_online()
    c.add_image(make_image(d("new"), layers=[d("new-l")], config=d("new-c")))
    c.add_image(make_manifest_list(d("new-list"), [d("new"), d("new-arm")]))
    expected = raws([d("new"), d("new-l"), d("new-c"), d("new-list"), d("new-arm")])
    await wait_seen(src, expected)
    assert await src.newly_in_use(raws([d("old"), d("old-l"), d("nothing")])) == set()
    watch = [q for _, p, q in c.requests if q.get("watch") == "true"]
    assert watch[0]["resourceVersion"] == src.images_version
    assert watch[0]["allowWatchBookmarks"] == "true"


async def test_online_watch_resumes_after_a_drop(fake: FakeOpenShift, source: Any) -> None:
    c, d = fake.cluster, fake_digest
    src = await source()
    await mark(src)
    await src.start_online()
    c.drop_watch(after_events=1)
    c.add_image(make_image(d("one"), config=d("one-c")))
    c.add_image(make_image(d("two"), config=d("two-c")))
    await wait_seen(src, raws([d("one"), d("two"), d("two-c")]))
    assert c.watch_connections >= 2
    resumed = [q for _, p, q in c.requests if q.get("watch") == "true"][1]
    assert resumed["resourceVersion"] == c.images[d("one")]["metadata"]["resourceVersion"]


async def test_online_watch_break_fails(fake: FakeOpenShift, source: Any) -> None:
    c, d = fake.cluster, fake_digest
    src = await source()
    await mark(src)
    await src.start_online()
    c.compact()  # the history the watch would resume from is gone
    c.drop_watch()
    c.add_image(make_image(d("missed"), config=d("missed-c")))
    with pytest.raises(SourceError, match="cannot resume"):
        async with asyncio.timeout(5):
            while True:
                await src.newly_in_use([raw(d("missed"))])
                await asyncio.sleep(0.02)


async def test_online_watch_gives_up_after_retries(fake: FakeOpenShift, source: Any) -> None:
    src = await source(watch_retries=2)
    await mark(src)
    await src.start_online()
    fake.cluster.fail("watch", status=503, times=None)
    fake.cluster.drop_watch()
    with pytest.raises(SourceError, match="3 attempts to resume failed"):
        async with asyncio.timeout(5):
            while True:
                await src.newly_in_use([])
                await asyncio.sleep(0.02)


async def test_online_needs_a_listing_and_a_watch(fake: FakeOpenShift, source: Any) -> None:
    src = await source()
    with pytest.raises(SourceError, match="listing"):
        await src.start_online()
    with pytest.raises(SourceError, match="not started"):
        await src.newly_in_use([])


async def test_online_watch_expired_at_start(fake: FakeOpenShift, source: Any) -> None:
    src = await source()
    await mark(src)
    fake.cluster.add_image(make_image(fake_digest("x"), config=fake_digest("y")))
    fake.cluster.compact()
    with pytest.raises(SourceError, match="expired"):
        await src.start_online()


# -- scale ----------------------------------------------------------------------------------


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples RSS in a thread: the event loop is busy parsing while memory peaks."""

    def __init__(self) -> None:
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


SCALE = 100_000
BASES = [fake_digest(f"base{i}") for i in range(50)]


def generated_image(i: int) -> dict[str, Any]:
    """A realistic schema2 image: a shared base layer, two own layers, own config."""
    return make_image(
        fake_digest(f"scale-image-{i}"),
        layers=[
            (BASES[i % 50], 30_000_000),
            fake_digest(f"scale-a-{i}"),
            fake_digest(f"scale-b-{i}"),
        ],
        config=fake_digest(f"scale-config-{i}"),
        repository=f"ns{i % 100}/app{i % 7}",
    )


async def test_scale_100k_images(fake: FakeOpenShift, source: Any) -> None:
    fake.cluster.generate_images(SCALE, generated_image)
    src = await source(page_size=500)
    progress = Progress()
    gc.collect()
    started = time.monotonic()
    with PeakRss() as memory:
        marks = await mark(src, progress=progress)
    elapsed = time.monotonic() - started
    growth = (memory.peak - memory.base) / 2**20
    print(
        f"\nopenshift source: {SCALE} images in pages of 500: {elapsed:.1f}s, "
        f"{len(marks.in_use)} digests in use, peak RSS growth {growth:.1f} MiB "
        f"(base {memory.base / 2**20:.0f} MiB)"
    )
    assert progress.manifests == SCALE
    assert len(marks.in_use) == SCALE * 4 + 50
    assert len(list_requests(fake.cluster)) == SCALE // 500
    assert growth < 200
