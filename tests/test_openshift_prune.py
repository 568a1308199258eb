"""OpenShift source end to end: a real docker-registry store, Image objects from a fake API."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from tests.harness.fake_openshift import FakeOpenShift, make_image, make_registry_deployment
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
    revisions,
    run_cli,
)
from tests.harness.registry import Registry, blobs_on_disk


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
