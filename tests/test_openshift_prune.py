"""OpenShift source end to end: a real docker-registry store, Image objects from a fake API."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from tests.harness.fake_openshift import (
    OCI_INDEX,
    SCHEMA2,
    FakeCluster,
    FakeOpenShift,
    make_image,
    make_image_stream,
    make_manifest_list,
    make_registry_deployment,
)
from tests.harness.images import (
    RegistryClient,
    config_blob,
    docker_manifest,
    random_layer,
    skopeo_pull,
)
from tests.harness.openshift_scenario import (
    Pushed,
    cluster_for,
    push,
    push_index,
    revisions,
    run_cli,
)
from tests.harness.registry import Registry, blobs_on_disk, running_registry


async def test_images_decide_exact_removals_and_kept_images_pull(
    openshift_store: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, images = openshift_store
    # app2 was deleted from the cluster (oc delete image): its unique blobs are orphans
    cluster = cluster_for(images, skip={"app2"})
    before, links_before = blobs_on_disk(registry), revisions(registry)
    async with FakeOpenShift(cluster) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        code, out, err = await run_cli(
            registry, "check", "--log-level", "info", "--log-format", "text", kubeconfig=kubeconfig
        )
        assert code == 0, err
        assert blobs_on_disk(registry) == before and revisions(registry) == links_before
        in_use = set().union(*(p.digests() for n, p in images.items() if n != "app2"))
        expected = before - in_use
        # app2's own layer, config and manifest: the shared base stays
        assert expected == images["app2"].digests() - {images["app2"].blobs[0].digest}
        assert out.splitlines()[0] == f"Would delete {len(expected)} blobs", out + err
        assert "Would delete 2 repositories" in out  # ns2/gone (no stream), a/b/c (bad name)
        assert "Would delete 1 manifest links" in out  # ns1/app@app2
        code, out, err = await run_cli(registry, "delete", kubeconfig=kubeconfig)
        assert code == 0, err
    assert out.splitlines()[0] == f"Deleted {len(expected)} blobs"
    assert blobs_on_disk(registry) == before - expected
    gone_links = links_before - revisions(registry)
    assert gone_links == {
        ("ns1/app", images["app2"].manifest.digest),
        ("ns2/gone", images["gone"].manifest.digest),
        ("a/b/c", images["deep"].manifest.digest),
    }
    repos = registry.root / "docker/registry/v2/repositories"
    assert not (repos / "ns2/gone/_manifests").exists()
    assert not (repos / "a/b/c/_layers").exists()
    # the multi-arch children stay linked and pullable by digest
    for i, name in enumerate(("app1", "multi", "web", "other")):
        p = images[name]
        skopeo_pull(registry.url, p.repo, p.tag, tmp_path / f"pull{i}")
    for j, child in enumerate(images["multi"].children):
        skopeo_pull(registry.url, "ns1/app", child.digest, tmp_path / f"child{j}")


@pytest.mark.parametrize(
    "fault",
    ["500 mid-list", "410 every continue", "403", "slow page", "malformed", "401"],
)
async def test_api_faults_fail_closed(
    openshift_store: tuple[Registry, dict[str, Pushed]], tmp_path: Path, fault: str
) -> None:
    registry, images = openshift_store
    cluster = cluster_for(images, skip={"app2"})
    match fault:
        case "500 mid-list":
            cluster.fail("images", page=2)
        case "410 every continue":
            cluster.expire_continue("images", page=2, times=None)
        case "403":
            cluster.forbid("imagestreams")
        case "slow page":
            cluster.slow("images", page=2, delay=30)
        case "malformed":
            cluster.malformed("imagestreams", page=1)
        case "401":
            cluster.tokens.clear()
    before, links = blobs_on_disk(registry), revisions(registry)
    async with FakeOpenShift(cluster) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        extra = ["--api-page-size", "2", "--api-timeout", "2s"]
        code, _out, err = await run_cli(registry, "delete", *extra, kubeconfig=kubeconfig)
    assert code == 1, err
    assert err.splitlines()[-1].startswith("error: ")
    if fault == "403":
        assert "list imagestreams.image.openshift.io" in err
    assert blobs_on_disk(registry) == before and revisions(registry) == links


async def test_delete_refused_unless_read_only_or_online(
    openshift_store: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, images = openshift_store
    cluster = cluster_for(images, skip={"app2"})
    cluster.read_only = False
    before = blobs_on_disk(registry)
    async with FakeOpenShift(cluster) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        code, _out, err = await run_cli(registry, "delete", kubeconfig=kubeconfig)
        assert code == 2 and "spec.readOnly" in err
        assert blobs_on_disk(registry) == before
        # spec.readOnly set, the operator still rolling it out: one old pod takes pushes
        cluster.read_only = True
        cluster.deployment = make_registry_deployment(read_only=True, running_replicas=3)
        code, _out, err = await run_cli(registry, "delete", kubeconfig=kubeconfig)
        assert code == 2, err
        assert "is rolling out: 2 of 2 replicas updated, 3 running" in err
        assert blobs_on_disk(registry) == before


async def test_image_created_during_online_delete_keeps_its_blobs(
    openshift_store: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, images = openshift_store
    client = RegistryClient(registry.url)
    rng = random.Random(9)
    # blobs of an image whose push is under way: uploaded, no manifest, no Image yet
    late_layers = [random_layer(rng, 2048)]
    late_cfg = config_blob(late_layers, label="late")
    late = docker_manifest(late_cfg, late_layers)
    for blob in [*late_layers, late_cfg]:
        client.upload_blob("ns1/web", blob)
    cluster = cluster_for(images, skip={"app2"})
    cluster.read_only = False
    # the image streams page answers slowly: the push completes while the run marks
    cluster.slow("imagestreams", page=1, delay=3)
    async with FakeOpenShift(cluster) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        run = asyncio.create_task(run_cli(registry, "delete", "--online", kubeconfig=kubeconfig))
        await asyncio.sleep(1.5)
        await asyncio.to_thread(client.push_manifest, "ns1/web", "late", late)
        cluster.add_image(
            make_image(late.digest, layers=late.layers, config=late.config, repository="ns1/web")
        )
        stream = cluster.streams[("ns1", "web")]
        stream["status"]["tags"].append(
            {
                "tag": "late",
                "items": [
                    {
                        "image": late.digest,
                        "created": "2024-05-01T10:00:00Z",
                        "dockerImageReference": "x",
                        "generation": 2,
                    }
                ],
            }
        )
        code, _out, err = await run
    assert code == 0, err
    left = blobs_on_disk(registry)
    assert {late.digest, late_cfg.digest, late_layers[0].digest} <= left
    assert not images["app2"].digests() - {images["app2"].blobs[0].digest} & left
    skopeo_pull(registry.url, "ns1/web", "late", tmp_path / "late")


async def test_multi_arch_children_without_images_keep_their_blobs(tmp_path: Path) -> None:
    """Only the index has an Image object (as after an import of the index alone): its
    children's configs and layers are read from the store and kept."""
    with running_registry(tmp_path / "registry") as registry:
        client = RegistryClient(registry.url)
        rng = random.Random(11)
        multi = push_index(client, rng, "ns1/app", "multi")
        orphans = set(client.upload_orphan_blobs("ns1/app", 2, rng))
        cluster = FakeCluster(read_only=True)
        children = [(c.digest, a) for c, a in zip(multi.children, ("amd64", "arm64"), strict=True)]
        cluster.add_image(
            make_manifest_list(
                multi.manifest.digest, children, media_type=OCI_INDEX, repository="ns1/app"
            )
        )
        cluster.add_stream(make_image_stream("ns1", "app", {"multi": [multi.manifest.digest]}))
        before = blobs_on_disk(registry)
        assert multi.digests() | orphans <= before
        async with FakeOpenShift(cluster) as api:
            kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
            code, out, err = await run_cli(registry, "delete", kubeconfig=kubeconfig)
            assert code == 0, err
            assert out.splitlines()[0] == "Deleted 2 blobs", out
            assert blobs_on_disk(registry) == before - orphans
            skopeo_pull(registry.url, "ns1/app", "multi", tmp_path / "multi")
            # a child manifest the store lost: what its layers are is unknown, nothing goes
            lost = multi.children[1].digest.removeprefix("sha256:")
            (registry.root / f"docker/registry/v2/blobs/sha256/{lost[:2]}/{lost}/data").unlink()
            more = set(client.upload_orphan_blobs("ns1/app", 1, rng))
            left = blobs_on_disk(registry)
            code, out, err = await run_cli(registry, "delete", kubeconfig=kubeconfig)
        assert code == 1, out + err
        assert f"manifest sha256:{lost}, a child of the stored manifest list" in err
        assert "is not in the store" in err and "blocks every run" in err
        assert blobs_on_disk(registry) == left and more <= left


async def test_image_without_config_metadata_is_completed_from_the_store(tmp_path: Path) -> None:
    """A schema2 Image without dockerImageMetadata: its manifest in the store names the
    config, which is kept; the run goes on."""
    with running_registry(tmp_path / "registry") as registry:
        client = RegistryClient(registry.url)
        rng = random.Random(12)
        plain = push(client, rng, "ns1/app", "v1", [])
        orphans = set(client.upload_orphan_blobs("ns1/app", 2, rng))
        image = make_image(plain.manifest.digest, layers=plain.manifest.layers, media_type=SCHEMA2)
        image.pop("dockerImageMetadata")
        cluster = FakeCluster(read_only=True)
        cluster.add_image(image)
        cluster.add_stream(make_image_stream("ns1", "app", {"v1": [plain.manifest.digest]}))
        before = blobs_on_disk(registry)
        async with FakeOpenShift(cluster) as api:
            kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
            code, out, err = await run_cli(registry, "delete", kubeconfig=kubeconfig)
        assert code == 0, err
        assert out.splitlines()[0] == "Deleted 2 blobs", out
        assert blobs_on_disk(registry) == before - orphans
        assert plain.manifest.config in blobs_on_disk(registry)
        skopeo_pull(registry.url, "ns1/app", "v1", tmp_path / "v1")
