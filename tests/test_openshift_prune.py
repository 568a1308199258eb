"""OpenShift source end to end: a real docker-registry store, Image objects from a fake API."""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.fake_openshift import (
    OCI_INDEX,
    OCI_MANIFEST,
    SCHEMA2,
    FakeCluster,
    FakeOpenShift,
    make_image,
    make_image_stream,
    make_manifest_list,
)
from tests.harness.images import (
    Blob,
    Manifest,
    RegistryClient,
    config_blob,
    docker_manifest,
    oci_index,
    oci_manifest,
    random_layer,
    skopeo_pull,
)
from tests.harness.registry import Registry, running_registry

ROOT = Path(__file__).resolve().parent.parent
ARM64 = {"architecture": "arm64", "os": "linux"}
AMD64 = {"architecture": "amd64", "os": "linux"}


@dataclass
class Pushed:
    repo: str
    tag: str
    manifest: Manifest
    blobs: list[Blob]
    children: list[Manifest] = field(default_factory=list)

    def digests(self) -> set[str]:
        out = {self.manifest.digest, *(b.digest for b in self.blobs)}
        return out | {c.digest for c in self.children}


def image_objects(p: Pushed) -> list[dict]:
    """The Image objects OpenShift would hold for a pushed image (children included)."""
    if p.children:
        children = [
            make_image(
                c.digest,
                layers=c.layers,
                config=c.config,
                media_type=OCI_MANIFEST,
                repository=p.repo,
            )
            for c in p.children
        ]
        top = make_manifest_list(
            p.manifest.digest,
            [(c.digest, a) for c, a in zip(p.children, ("amd64", "arm64"), strict=True)],
            media_type=OCI_INDEX,
            repository=p.repo,
        )
        return [top, *children]
    media = SCHEMA2 if b"docker.distribution" in p.manifest.data else OCI_MANIFEST
    return [
        make_image(
            p.manifest.digest,
            layers=p.manifest.layers,
            config=p.manifest.config,
            media_type=media,
            repository=p.repo,
        )
    ]


def push(
    client: RegistryClient,
    rng: random.Random,
    repo: str,
    tag: str,
    shared: list[Blob],
    oci: bool = False,
) -> Pushed:
    layers = [*shared, random_layer(rng, 2048)]
    cfg = config_blob(layers, label=f"{repo}:{tag}")
    manifest = (oci_manifest if oci else docker_manifest)(cfg, layers)
    client.push_image(repo, tag, manifest, [*layers, cfg])
    return Pushed(repo, tag, manifest, [*layers, cfg])


def push_index(client: RegistryClient, rng: random.Random, repo: str, tag: str) -> Pushed:
    children, blobs = [], []
    for platform in (AMD64, ARM64):
        layer = random_layer(rng, 2048)
        cfg = config_blob([layer], platform=platform)
        child = oci_manifest(cfg, [layer])
        client.push_image(repo, None, child, [layer, cfg])
        children.append(child)
        blobs += [layer, cfg]
    index = oci_index([(children[0], AMD64), (children[1], ARM64)])
    client.push_manifest(repo, tag, index)
    return Pushed(repo, tag, index, blobs, children)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Registry, dict[str, Pushed]]]:
    with running_registry(tmp_path / "registry") as registry:
        client = RegistryClient(registry.url)
        rng = random.Random(5)
        base = [random_layer(rng, 4096)]
        images = {
            "app1": push(client, rng, "ns1/app", "v1", base),
            "app2": push(client, rng, "ns1/app", "v2", base, oci=True),
            "multi": push_index(client, rng, "ns1/app", "multi"),
            "web": push(client, rng, "ns1/web", "latest", base),
            "other": push(client, rng, "ns2/app", "v1", base),
            "gone": push(client, rng, "ns2/gone", "v1", []),
            "deep": push(client, rng, "a/b/c", "v1", []),
        }
        yield registry, images


def cluster_for(images: dict[str, Pushed], skip: set[str]) -> FakeCluster:
    cluster = FakeCluster(read_only=True)
    tags: dict[tuple[str, str], dict[str, list[str]]] = {}
    for name, pushed in images.items():
        if name in skip:
            continue
        cluster.add_images(image_objects(pushed))
        ns, _, stream = pushed.repo.partition("/")
        tags.setdefault((ns, stream), {})[pushed.tag] = [pushed.manifest.digest]
    for (ns, stream), stream_tags in tags.items():
        if (ns, stream) not in (("ns2", "gone"), ("a", "b/c")):
            cluster.add_stream(make_image_stream(ns, stream, stream_tags))
    return cluster


async def run_cli(registry: Registry, *args: str, kubeconfig: Path) -> tuple[int, str, str]:
    env = {**os.environ, "KUBECONFIG": ""}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon",
        *args,
        "--source",
        "openshift",
        "--kubeconfig",
        str(kubeconfig),
        "--registry-config",
        str(registry.config_path),
        "--grace",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


def on_disk(registry: Registry) -> set[str]:
    base = registry.root / "docker/registry/v2/blobs/sha256"
    return {"sha256:" + p.parent.name for p in base.glob("*/*/data")}


def revisions(registry: Registry) -> set[tuple[str, str]]:
    base = registry.root / "docker/registry/v2/repositories"
    return {
        (str(p.parent.relative_to(base)).split("/_manifests")[0], "sha256:" + p.parent.name)
        for p in base.glob("**/_manifests/revisions/sha256/*/link")
    }


async def test_images_decide_exact_removals_and_kept_images_pull(
    store: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, images = store
    # app2 was deleted from the cluster (oc delete image): its unique blobs are orphans
    cluster = cluster_for(images, skip={"app2"})
    before, links_before = on_disk(registry), revisions(registry)
    async with FakeOpenShift(cluster) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        code, out, err = await run_cli(
            registry, "check", "--log-level", "info", "--log-format", "text", kubeconfig=kubeconfig
        )
        assert code == 0, err
        assert on_disk(registry) == before and revisions(registry) == links_before
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
    assert on_disk(registry) == before - expected
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
    store: tuple[Registry, dict[str, Pushed]], tmp_path: Path, fault: str
) -> None:
    registry, images = store
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
    before, links = on_disk(registry), revisions(registry)
    async with FakeOpenShift(cluster) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        extra = ["--api-page-size", "2", "--api-timeout", "2s"]
        code, _out, err = await run_cli(registry, "delete", *extra, kubeconfig=kubeconfig)
    assert code == 1, err
    assert err.splitlines()[-1].startswith("error: ")
    if fault == "403":
        assert "list imagestreams.image.openshift.io" in err
    assert on_disk(registry) == before and revisions(registry) == links


async def test_delete_refused_unless_read_only_or_online(
    store: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, images = store
    cluster = cluster_for(images, skip={"app2"})
    cluster.read_only = False
    before = on_disk(registry)
    async with FakeOpenShift(cluster) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        code, _out, err = await run_cli(registry, "delete", kubeconfig=kubeconfig)
    assert code == 2 and "spec.readOnly" in err
    assert on_disk(registry) == before


async def test_image_created_during_online_delete_keeps_its_blobs(
    store: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, images = store
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
    left = on_disk(registry)
    assert {late.digest, late_cfg.digest, late_layers[0].digest} <= left
    assert not images["app2"].digests() - {images["app2"].blobs[0].digest} & left
    skopeo_pull(registry.url, "ns1/web", "late", tmp_path / "late")
