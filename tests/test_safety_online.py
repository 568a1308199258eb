"""Concurrent pushes during an online delete (openshift source): every push that succeeds pulls."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest

from daemon import layout
from daemon.logs import make_logger
from daemon.prune import DELETE, Engine, RunFailed, RunOptions
from daemon.sources.openshift import create
from daemon.storage.base import StorageError
from daemon.storage.filesystem import FilesystemStorage
from tests.harness.fake_openshift import FakeOpenShift, make_image, make_image_stream
from tests.harness.images import (
    Blob,
    RegistryClient,
    RegistryHTTPError,
    config_blob,
    docker_manifest,
    random_layer,
    skopeo_pull,
)
from tests.harness.openshift_scenario import (
    Pushed,
    cluster_for,
    image_objects,
    push,
    revisions,
    run_cli,
)
from tests.harness.registry import Registry, blobs_on_disk
from tests.test_safety_crash import plant_orphans

OLD = time.time() - 7200


def backdate(registry: Registry, blobs: list[Blob]) -> None:
    base = registry.root / "docker/registry/v2/blobs/sha256"
    for blob in blobs:
        hexd = blob.digest[7:]
        os.utime(base / hexd[:2] / hexd / "data", (OLD, OLD))


async def test_pushes_reusing_orphan_layers_during_online_delete(
    openshift_store: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, images = openshift_store
    client = RegistryClient(registry.url)
    rng = random.Random(21)
    # old orphan layers still linked into ns1/web: a client pushing there sees them present
    # and does not upload them again, the dangerous case
    old_layers = [random_layer(rng, 1024) for _ in range(40)]
    for blob in old_layers:
        client.upload_blob("ns1/web", blob)
    backdate(registry, old_layers)
    plant_orphans(registry, 4000, seed=22)  # enough work for the run to take a while
    cluster = cluster_for(images, skip=set())
    cluster.read_only = False
    stream = cluster.streams[("ns1", "web")]
    succeeded: list[tuple[str, str, set[str]]] = []
    failed: list[str] = []
    reused: set[str] = set()
    stop = asyncio.Event()

    async def pusher(n: int) -> None:
        local = random.Random(100 + n)
        i = 0
        while not stop.is_set() and i < 25:
            i += 1
            tag = f"p{n}-{i}"
            layers = [*local.sample(old_layers, 2), random_layer(local, 512)]
            cfg = config_blob(layers, label=tag)
            manifest = docker_manifest(cfg, layers)
            # OpenShift's registry creates the Image while it accepts the manifest
            cluster.add_image(
                make_image(
                    manifest.digest,
                    layers=manifest.layers,
                    config=manifest.config,
                    repository="ns1/web",
                )
            )
            try:
                await asyncio.to_thread(client.push_image, "ns1/web", tag, manifest, [*layers, cfg])
            except RegistryHTTPError as exc:
                cluster.delete_image(manifest.digest)
                failed.append(f"{tag}: {exc.status}")
                continue
            stream["status"]["tags"].append(
                {
                    "tag": tag,
                    "items": [
                        {
                            "image": manifest.digest,
                            "created": "2024-05-01T10:00:00Z",
                            "dockerImageReference": "x",
                            "generation": 1,
                        }
                    ],
                }
            )
            succeeded.append((tag, manifest.digest, {b.digest for b in [*layers, cfg]}))
            reused.update(b.digest for b in layers[:2])
            await asyncio.sleep(local.uniform(0.05, 0.4))  # spread over the whole run

    async with FakeOpenShift(cluster) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        run = asyncio.create_task(
            run_cli(registry, "delete", "--online", "--grace", "1h", kubeconfig=kubeconfig)
        )
        pushers = [asyncio.create_task(pusher(n)) for n in range(3)]
        code, out, err = await run
        stop.set()
        await asyncio.gather(*pushers)
    # a push that re-uploads a parked blob slower than the settle time trips the after-check:
    # the run stops there, and what matters below still holds
    assert code == 0 or "referenced by images created during the run" in err, out + err
    print(f"pushes: {len(succeeded)} succeeded, {len(failed)} failed; reused {len(reused)} orphans")
    assert succeeded, failed
    assert reused, "no push reused an orphan candidate"
    left = blobs_on_disk(registry)
    for i, (tag, digest, blobs) in enumerate(succeeded):
        assert blobs | {digest} <= left, tag
        skopeo_pull(registry.url, "ns1/web", tag, tmp_path / f"pull{i}")


async def test_stream_created_after_the_mark_keeps_its_repository(
    openshift_store: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    """A push that finished just before the run has its links but no ImageStream yet; the
    stream appears once the run has marked. Neither its repository nor a link written
    after the scan may go."""
    registry, images = openshift_store
    client = RegistryClient(registry.url)
    late = push(client, random.Random(31), "ns3/late", "v1", [])
    cluster = cluster_for(images, skip=set())
    cluster.read_only = False
    gone = registry.root / "docker/registry/v2/repositories/ns2/gone"
    written_later = gone / "_manifests/revisions/sha256" / images["app1"].manifest.digest[7:]

    def after_the_mark() -> None:
        # OpenShift's registry creates the Image and the stream after storing the manifest
        cluster.add_images(image_objects(late))
        cluster.add_stream(make_image_stream("ns3", "late", {"v1": [late.manifest.digest]}))
        # another push links a manifest into ns2/gone, whose stream comes later
        written_later.mkdir(parents=True)
        (written_later / "link").write_text(images["app1"].manifest.digest)

    # the online run opens its image watch right after the mark: the race, made exact
    cluster.on_request("watch", after_the_mark)
    async with FakeOpenShift(cluster) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        code, out, err = await run_cli(registry, "delete", "--online", kubeconfig=kubeconfig)
    assert code == 0, out + err
    assert "Deleted 2 repositories" in out, out  # ns2/gone (what the scan saw), a/b/c
    links = revisions(registry)
    assert ("ns3/late", late.manifest.digest) in links
    assert ("ns2/gone", images["gone"].manifest.digest) not in links
    assert (written_later / "link").read_text() == images["app1"].manifest.digest
    assert late.digests() <= blobs_on_disk(registry)
    skopeo_pull(registry.url, "ns3/late", "v1", tmp_path / "late")
    for i, name in enumerate(("app1", "multi", "web", "other")):
        p = images[name]
        skopeo_pull(registry.url, p.repo, p.tag, tmp_path / f"pull{i}")


class RefusingMove(FilesystemStorage):
    """A store that parks one blob, then refuses the next copy (as S3 refused CopyObject
    above 5 GiB)."""

    def __init__(self, root: str) -> None:
        super().__init__(root, 2)
        self.moves = 0

    def _move(self, src: str, dst: str) -> bool:
        if src.startswith(layout.BLOBS):
            self.moves += 1
            if self.moves > 1:
                raise StorageError(f"cannot copy {src}: EntityTooLarge (injected)")
        return super()._move(src, dst)


def layer_links(registry: Registry) -> dict[str, str]:
    base = registry.root / "docker/registry/v2/repositories"
    return {str(p.relative_to(base)): p.read_text() for p in base.glob("**/_layers/sha256/*/link")}


async def test_links_come_back_when_parking_fails(
    openshift_store: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, images = openshift_store
    cluster = cluster_for(images, skip={"app2"})  # app2's own blobs are the candidates
    cluster.read_only = False
    before, links = blobs_on_disk(registry), layer_links(registry)
    doomed = images["app2"].digests() - {images["app2"].blobs[0].digest}
    storage = RefusingMove(str(registry.root))
    async with FakeOpenShift(cluster) as api:
        source = await create(str(api.write_kubeconfig(tmp_path / "kubeconfig")))
        options = RunOptions(mode=DELETE, grace=0, online=True, online_settle=0.1)
        engine = Engine(storage, source, options, log=make_logger("error"))
        try:
            with pytest.raises(RunFailed, match="EntityTooLarge"):
                await engine.run()
        finally:
            await source.close()
            await storage.close()
    assert storage.moves >= 2  # one blob parked, the next ones refused
    assert blobs_on_disk(registry) == before  # the parked one is back
    v2 = registry.root / "docker/registry/v2"
    assert not (v2 / "_registry-pruned").exists()  # nothing parked is left
    # the links the batch removed before parking are back, each naming its blob (ns2/gone
    # and a/b/c have no stream: removed whole before the blobs, as they should be)
    kept = {path: link for path, link in links.items() if path.startswith("ns")}
    kept = {path: link for path, link in kept.items() if not path.startswith("ns2/gone/")}
    assert {p: v for p, v in layer_links(registry).items() if p in kept} == kept
    assert set(layer_links(registry)) == set(kept)
    assert any(d[7:] in path for d in doomed for path in kept)  # the batch had some
    registry.restart(read_only=False)
    for i, name in enumerate(("app1", "multi", "web", "other")):
        p = images[name]
        skopeo_pull(registry.url, p.repo, p.tag, tmp_path / f"pull{i}")
