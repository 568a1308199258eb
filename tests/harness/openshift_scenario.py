"""The OpenShift test scenario: images pushed to a real registry and their Image objects."""

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
)
from tests.harness.registry import Registry, running_registry

ROOT = Path(__file__).resolve().parents[2]
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


def push_scenario(registry: Registry) -> dict[str, Pushed]:
    """The OpenShift scenario's images, pushed to ``registry`` (any storage)."""
    client = RegistryClient(registry.url)
    rng = random.Random(5)
    base = [random_layer(rng, 4096)]
    return {
        "app1": push(client, rng, "ns1/app", "v1", base),
        "app2": push(client, rng, "ns1/app", "v2", base, oci=True),
        "multi": push_index(client, rng, "ns1/app", "multi"),
        "web": push(client, rng, "ns1/web", "latest", base),
        "other": push(client, rng, "ns2/app", "v1", base),
        "gone": push(client, rng, "ns2/gone", "v1", []),
        "deep": push(client, rng, "a/b/c", "v1", []),
    }


@pytest.fixture
def openshift_store(tmp_path: Path) -> Iterator[tuple[Registry, dict[str, Pushed]]]:
    with running_registry(tmp_path / "registry") as registry:
        yield registry, push_scenario(registry)


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


def revisions(registry: Registry) -> set[tuple[str, str]]:
    base = registry.root / "docker/registry/v2/repositories"
    return {
        (str(p.parent.relative_to(base)).split("/_manifests")[0], "sha256:" + p.parent.name)
        for p in base.glob("**/_manifests/revisions/sha256/*/link")
    }
