"""A store with old tag revisions, indexes and OCI 1.1 referrers, pushed through the real
registry: what an untagged run must remove, and where distribution 2.8 differs."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from tests.harness.images import (
    AMD64,
    ARM64,
    OCI_EMPTY,
    Blob,
    Manifest,
    RegistryClient,
    _json_bytes,
    config_blob,
    oci_index,
    oci_manifest,
    random_layer,
)

DAY = 86400.0
SBOM = "application/vnd.example.sbom.v1+json"
SIGNATURE = "application/vnd.example.signature.v1"


@dataclass
class UntaggedScenario:
    kept_tags: list[tuple[str, str]] = field(default_factory=list)  # (repo, tag) to pull
    kept_referrers: list[tuple[str, str]] = field(default_factory=list)  # (repo, digest)
    #: (repo, digest) -> reason: the revisions an untagged run removes
    removed: dict[tuple[str, str], str] = field(default_factory=dict)
    #: blobs an untagged run frees (with grace 0)
    freed: set[str] = field(default_factory=set)
    #: the two documented differences from distribution 2.8's --delete-untagged, which
    #: frees these too: the tagged index's children's config and layers, and the kept
    #: image's referrer chain (SBOM, its signature, their payloads and empty config)
    index_children: set[str] = field(default_factory=set)
    referrer_chain: set[str] = field(default_factory=set)
    #: the three-tag repository's tags, by how many days ago each was pushed
    three_tags: dict[str, float] = field(default_factory=dict)


def _artifact(rng: random.Random, kind: str, subject: Manifest) -> tuple[Manifest, list[Blob]]:
    """An OCI 1.1 artifact about ``subject``: empty config, one payload of its own."""
    empty = Blob(b"{}", OCI_EMPTY)
    payload = Blob(_json_bytes({"kind": kind, "n": rng.getrandbits(64)}), kind)
    return oci_manifest(empty, [payload], artifact_type=kind, subject=subject), [empty, payload]


def build_untagged(registry: Any, seed: int = 16) -> UntaggedScenario:
    """Push the scenario into ``registry`` (filesystem storage; tag times are set on disk)."""
    rng = random.Random(seed)
    client = RegistryClient(registry.url)
    sc = UntaggedScenario()
    base = random_layer(rng, 2048)

    def image(
        label: str, *shared: Blob, plat: dict[str, str] = AMD64
    ) -> tuple[Manifest, list[Blob]]:
        own = random_layer(rng, 2048)
        layers = [base, *shared, own]
        cfg = config_blob(layers, platform=plat, label=label)
        return oci_manifest(cfg, layers), [*layers, cfg]

    def own(manifest: Manifest, blobs: list[Blob]) -> set[str]:
        """The manifest and its blobs but the shared base layer."""
        return {manifest.digest} | {b.digest for b in blobs if b.digest != base.digest}

    # rel: three tags for retention; v1 shares a layer with an old web:latest
    shared = random_layer(rng, 2048)
    for tag, days in (("v1", 40.0), ("v2", 20.0), ("v3", 1.0)):
        manifest, blobs = image(f"rel {tag}", *([shared] if tag == "v1" else []))
        client.push_image("rel", tag, manifest, blobs)
        sc.kept_tags.append(("rel", tag))
        sc.three_tags[tag] = days

    # web:latest overwritten: three old revisions, one of them with a signature
    revisions = []
    for n in range(4):
        manifest, blobs = image(f"latest {n}", *([shared] if n == 0 else []))
        client.push_image("web", "latest", manifest, blobs)
        revisions.append((manifest, blobs))
    sc.kept_tags.append(("web", "latest"))
    for manifest, blobs in revisions[:3]:
        sc.removed[("web", manifest.digest)] = "untagged"
        sc.freed |= own(manifest, blobs) - {shared.digest}  # rel:v1 keeps the shared layer
    old_signature, blobs = _artifact(rng, SIGNATURE, revisions[1][0])
    client.push_image("web", None, old_signature, blobs)
    sc.removed[("web", old_signature.digest)] = "orphan-referrer"
    sc.freed |= {old_signature.digest, blobs[1].digest}  # the empty config stays (below)

    # a tagged index whose children are untagged: they stay
    children = []
    for plat in (AMD64, ARM64):
        manifest, blobs = image(f"multi {plat['architecture']}", plat=plat)
        client.push_image("web", None, manifest, blobs)
        children.append((manifest, plat))
        sc.index_children |= own(manifest, blobs) - {manifest.digest}
    client.push_manifest("web", "multi", oci_index(children))
    sc.kept_tags.append(("web", "multi"))

    # an untagged index and its children: all go
    children = []
    for plat in (AMD64, ARM64):
        manifest, blobs = image(f"loose {plat['architecture']}", plat=plat)
        client.push_image("web", None, manifest, blobs)
        children.append((manifest, plat))
        sc.removed[("web", manifest.digest)] = "untagged"
        sc.freed |= own(manifest, blobs)
    loose = oci_index(children)
    client.push_manifest("web", loose.digest, loose)
    sc.removed[("web", loose.digest)] = "untagged"
    sc.freed.add(loose.digest)

    # the current latest's SBOM, and a signature of the SBOM: both stay
    sbom, blobs = _artifact(rng, SBOM, revisions[3][0])
    client.push_image("web", None, sbom, blobs)
    signature, sig_blobs = _artifact(rng, SIGNATURE, sbom)
    client.push_image("web", None, signature, sig_blobs)
    sc.kept_referrers += [("web", sbom.digest), ("web", signature.digest)]
    sc.referrer_chain |= {sbom.digest, signature.digest, *(b.digest for b in blobs + sig_blobs)}

    # a tag deleted through the API (distribution 2.8 deletes by digest, untagging it)
    manifest, blobs = image("gone")
    client.push_image("web", "gone", manifest, blobs)
    client.delete_manifest("web", manifest.digest)
    sc.freed |= own(manifest, blobs)

    # push times of the three tags, as the current/link's modification time says them
    now = time.time()
    for tag, days in sc.three_tags.items():
        link = (
            registry.root
            / f"docker/registry/v2/repositories/rel/_manifests/tags/{tag}/current/link"
        )
        os.utime(link, (now - days * DAY, now - days * DAY))
    return sc
