"""Hostile stores, written by the real registry: ways a pruner can lose an image (issue 20).

One registry holds every case: manifest keys spelled in other cases, blobs and children named
by sha384/sha512 digests, a namespace, a revision directory and blob directories moved to
another volume and linked back. Each must still pull after ``registry-pruned delete``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import check_logged, pruned, would_delete
from tests.harness.images import (
    AMD64,
    ARM64,
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Blob,
    Manifest,
    RegistryClient,
    api_pull,
    config_blob,
    oci_manifest,
    random_layer,
    skopeo_pull,
)
from tests.harness.registry import Registry, running_registry


def foreign_digest(algo: str, data: bytes) -> str:
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


def upload_as(client: RegistryClient, name: str, data: bytes, digest: str) -> None:
    """Upload ``data`` naming it by ``digest`` (any algorithm), as a client may."""
    location, _ = client._start(name)
    client.request(
        "PUT",
        client._with_digest(location, digest),
        data=data,
        headers={"Content-Type": "application/octet-stream"},
        expect=(201,),
    )


def push_raw(client: RegistryClient, name: str, ref: str, doc: dict, media_type: str) -> str:
    """PUT a manifest document as it is (keys spelled as given); its sha256 digest."""
    manifest = Manifest(json.dumps(doc).encode(), media_type)
    return client.push_manifest(name, ref, manifest)


@dataclass
class Store:
    registry: Registry
    other_volume: Path
    skopeo: list[tuple[str, str]] = field(default_factory=list)  # pulled with skopeo
    api: list[tuple[str, str]] = field(default_factory=list)  # pulled through the API
    #: blobs distribution's collector would delete that we keep (sha384/sha512 references,
    #: a symbolic-linked blob directory not in use)
    kept_beyond_distribution: set[str] = field(default_factory=set)
    orphans: set[str] = field(default_factory=set)  # blobs a delete must remove
    foreign_orphan_link: Path = Path()  # the sha512 link of an orphan: goes with it
    moved_orphan: str = ""  # an orphan linked only from the symlinked namespace: kept
    linked_orphan: str = ""  # an orphan whose blob directory is a symlink: kept
    aliased_orphan: str = ""  # an orphan linked from a repository a link points to: kept
    foreign_link: Path = Path()  # a sha512 layer link that a manifest needs

    @property
    def v2(self) -> Path:
        return self.registry.root / "docker/registry/v2"

    def blob_dir(self, digest: str) -> Path:
        hexd = digest.partition(":")[2]
        return self.v2 / "blobs/sha256" / hexd[:2] / hexd


def _keys_in_other_cases(client: RegistryClient, rng: random.Random, store: Store) -> None:
    """Case 1: every key the parser reads, spelled in other cases (Go reads them all)."""
    layer, layer2 = random_layer(rng), random_layer(rng)
    cfg = config_blob([layer, layer2], label="keys oci")
    for blob in (layer, layer2, cfg):
        client.upload_blob("keys/app", blob)
    # the case: only "Layers"
    push_raw(
        client,
        "keys/app",
        "layers",
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": cfg.descriptor(),
            "Layers": [layer.descriptor(), layer2.descriptor()],
        },
        OCI_MANIFEST,
    )
    store.skopeo.append(("keys/app", "layers"))
    # every key in another spelling, the long s (U+017F) included: Go folds it to "s"
    dlayer = random_layer(rng, media_type=DOCKER_LAYER)
    dcfg = config_blob([dlayer], media_type=DOCKER_CONFIG, label="keys docker")
    for blob in (dlayer, dcfg):
        client.upload_blob("keys/app", blob)
    child = push_raw(
        client,
        "keys/app",
        "docker",
        {
            "\u017fchemaVERSION": 2,
            "MediaType": DOCKER_MANIFEST,
            "CONFIG": {"MEDIATYPE": DOCKER_CONFIG, "Size": dcfg.size, "DIGEST": dcfg.digest},
            "LAYERS": [{"mediatype": DOCKER_LAYER, "SIZE": dlayer.size, "Digest": dlayer.digest}],
        },
        DOCKER_MANIFEST,
    )
    store.skopeo.append(("keys/app", "docker"))
    oci_child = push_raw(
        client,
        "keys/app",
        "oci",
        {
            "SchemaVersion": 2,
            "mediatype": OCI_MANIFEST,
            "Config": {"mediaType": OCI_CONFIG, "size": cfg.size, "dIgEsT": cfg.digest},
            "lAyErS": [{"mediaType": OCI_LAYER, "size": layer.size, "digest": layer.digest}],
        },
        OCI_MANIFEST,
    )
    entry = client.get_manifest("keys/app", child)
    docker_size = len(entry.body)
    oci_size = len(client.get_manifest("keys/app", oci_child).body)
    push_raw(
        client,
        "keys/app",
        "index",
        {
            "SCHEMAVERSION": 2,
            "MEDIATYPE": OCI_INDEX,
            "Manifests": [
                {
                    "MediaType": DOCKER_MANIFEST,
                    "Size": docker_size,
                    "Digest": child,
                    "platform": AMD64,
                },
                {
                    "mediaType": OCI_MANIFEST,
                    "SIZE": oci_size,
                    "DIGEST": oci_child,
                    "platform": ARM64,
                },
            ],
        },
        OCI_INDEX,
    )
    store.skopeo.append(("keys/app", "index"))


def _foreign_digests(client: RegistryClient, rng: random.Random, store: Store) -> None:
    """Case 2: blobs, configs, index children and subjects named by sha384/sha512."""
    l512, l384 = random_layer(rng), random_layer(rng)
    cfg = config_blob([l512, l384], label="sha512 config")
    upload_as(client, "foreign/app", l512.data, foreign_digest("sha512", l512.data))
    upload_as(client, "foreign/app", l384.data, foreign_digest("sha384", l384.data))
    upload_as(client, "foreign/app", cfg.data, foreign_digest("sha512", cfg.data))
    push_raw(
        client,
        "foreign/app",
        "layers",
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": cfg.descriptor(digest=foreign_digest("sha512", cfg.data)),
            "layers": [
                l512.descriptor(digest=foreign_digest("sha512", l512.data)),
                l384.descriptor(digest=foreign_digest("sha384", l384.data)),
            ],
        },
        OCI_MANIFEST,
    )
    store.api.append(("foreign/app", "layers"))
    store.kept_beyond_distribution |= {l512.digest, l384.digest, cfg.digest}
    hexd = foreign_digest("sha512", l512.data).partition(":")[2]
    store.foreign_link = store.v2 / "repositories/foreign/app/_layers/sha512" / hexd

    dlayer = random_layer(rng, media_type=DOCKER_LAYER)
    dcfg = config_blob([dlayer], media_type=DOCKER_CONFIG, label="sha384 config")
    client.upload_blob("foreign/app", dlayer)
    upload_as(client, "foreign/app", dcfg.data, foreign_digest("sha384", dcfg.data))
    push_raw(
        client,
        "foreign/app",
        "config",
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {
                "mediaType": DOCKER_CONFIG,
                "size": dcfg.size,
                "digest": foreign_digest("sha384", dcfg.data),
            },
            "layers": [dlayer.with_media_type(DOCKER_LAYER).descriptor()],
        },
        DOCKER_MANIFEST,
    )
    store.api.append(("foreign/app", "config"))
    store.kept_beyond_distribution.add(dcfg.digest)

    # index children by sha512 and sha384: the registry accepts them once the child's bytes
    # are uploaded as a blob under that name (it looks manifests up in _layers too)
    children: list[tuple[Manifest, str, dict[str, str]]] = []
    for algo, plat in (("sha512", AMD64), ("sha384", ARM64)):
        own = random_layer(rng)
        ccfg = config_blob([own], platform=plat, label=f"{algo} child")
        child = oci_manifest(ccfg, [own])
        client.push_image("foreign/idx", None, child, [own, ccfg])
        upload_as(client, "foreign/idx", child.data, foreign_digest(algo, child.data))
        children.append((child, foreign_digest(algo, child.data), plat))
        if algo == "sha512":
            # its revision goes: the index is all that names it (distribution loses it)
            client.delete_manifest("foreign/idx", child.digest)
            store.kept_beyond_distribution |= {child.digest, own.digest, ccfg.digest}
    push_raw(
        client,
        "foreign/idx",
        "multi",
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                child.descriptor(digest=digest, platform=plat) for child, digest, plat in children
            ],
        },
        OCI_INDEX,
    )
    store.api.append(("foreign/idx", "multi"))
    # referrers whose subject is named by sha512 and sha384
    for child, digest, _plat in children:
        empty = Blob(b"{}", OCI_EMPTY)
        payload = Blob(json.dumps({"about": digest}).encode(), "application/vnd.example+json")
        client.upload_blob("foreign/idx", empty)
        client.upload_blob("foreign/idx", payload)
        referrer = _push_referrer(client, empty, payload, child, digest)
        store.api.append(("foreign/idx", referrer))

    # an orphan uploaded by sha512: deleted, and its sha512 link with it
    orphan = random_layer(rng)
    upload_as(client, "foreign/app", orphan.data, foreign_digest("sha512", orphan.data))
    store.orphans.add(orphan.digest)
    hexd = foreign_digest("sha512", orphan.data).partition(":")[2]
    store.foreign_orphan_link = store.v2 / "repositories/foreign/app/_layers/sha512" / hexd


def _push_referrer(
    client: RegistryClient, empty: Blob, payload: Blob, child: Manifest, digest: str
) -> str:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example+json",
        "config": empty.descriptor(),
        "layers": [payload.descriptor()],
        "subject": child.descriptor(digest=digest),
    }
    manifest = Manifest(json.dumps(doc).encode(), OCI_MANIFEST)
    return client.push_manifest("foreign/idx", manifest.digest, manifest)


def _symlinked_directories(client: RegistryClient, rng: random.Random, store: Store) -> None:
    """Case 3: a namespace, a revision directory and blob directories moved to another
    volume and linked back; the registry serves them all."""
    for name in ("moved/app", "moved/team/tool", "revlink/app", "bloblink/app", "aliased/app"):
        layer = random_layer(rng)
        cfg = config_blob([layer], label=name)
        client.push_image(name, "v1", oci_manifest(cfg, [layer]), [layer, cfg])
        store.skopeo.append((name, "v1"))
        if name == "aliased/app":
            store.skopeo.append(("alias/app", "v1"))
        if name == "bloblink/app":
            _move_and_link(store.blob_dir(layer.digest), store.other_volume / "blob-in-use")
        if name == "revlink/app":
            manifest = oci_manifest(cfg, [layer])
            revision = store.v2 / "repositories/revlink/app/_manifests/revisions/sha256"
            _move_and_link(revision / manifest.digest[7:], store.other_volume / "revision")
    # orphans: one linked only from the moved namespace (its link cannot go: kept), one
    # whose blob directory is a link (never deleted through it: kept)
    (store.moved_orphan,) = client.upload_orphan_blobs("moved/app", 1, rng)
    (store.linked_orphan,) = client.upload_orphan_blobs("bloblink/app", 1, rng)
    _move_and_link(store.blob_dir(store.linked_orphan), store.other_volume / "blob-orphan")
    store.kept_beyond_distribution.add(store.linked_orphan)
    repositories = store.v2 / "repositories"
    _move_and_link(repositories / "moved", store.other_volume / "moved")
    # a namespace also served under a second name, through a link inside the store
    (store.aliased_orphan,) = client.upload_orphan_blobs("aliased/app", 1, rng)
    os.symlink(repositories / "aliased", repositories / "alias")


def _move_and_link(path: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, target)
    os.symlink(target, path)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    base = tmp_path_factory.mktemp("hostile")
    with running_registry(base / "registry") as registry:
        client = RegistryClient(registry.url)
        rng = random.Random(20)
        built = Store(registry, base / "other-volume")
        # plain orphans, so that a delete has work where nothing is odd
        built.orphans |= set(client.upload_orphan_blobs("plain/app", 2, rng))
        _keys_in_other_cases(client, rng, built)
        _foreign_digests(client, rng, built)
        _symlinked_directories(client, rng, built)
        for n, (name, ref) in enumerate(built.skopeo):
            skopeo_pull(registry.url, name, ref, base / f"before-{n}")
        for name, ref in built.api:
            api_pull(client, name, ref)
        registry.restart(read_only=True)
        yield built


def test_check_agrees_with_distribution_where_it_keeps_the_blobs(store: Store) -> None:
    """Cases 1 and 3: distribution keeps every blob; our candidates are exactly its own.
    Case 2 (and a linked blob directory not in use) it deletes: we keep them."""
    eligible = store.registry.garbage_collect(dry_run=True)
    result = check_logged(store.registry.config_path)
    assert result.returncode == 0, result.stderr
    ours = would_delete(result.stderr)
    assert ours == eligible - store.kept_beyond_distribution
    assert store.kept_beyond_distribution <= eligible  # distribution would lose them
    assert store.orphans | {store.moved_orphan, store.aliased_orphan} <= ours
    assert "unknown_keys=0" in result.stderr  # _layers/sha512 and sha384 are known keys
    assert "moved is a symbolic link" in result.stderr


def test_an_unresolvable_sha512_reference_fails_closed(store: Store, tmp_path: Path) -> None:
    aside = tmp_path / "link"
    shutil.move(store.foreign_link, aside)
    try:
        result = pruned("check", "--registry-config", store.registry.config_path, "--grace", "0")
    finally:
        shutil.move(aside, store.foreign_link)
    assert result.returncode == 1
    assert "foreign/app references sha512:" in result.stderr
    assert "nothing was deleted" in result.stderr and "?digest=sha512:" in result.stderr


def test_a_symlink_loop_is_read_once_and_reported(store: Store) -> None:
    loop = store.other_volume / "moved" / "loop"
    os.symlink(store.v2 / "repositories/moved", loop)
    try:
        result = check_logged(store.registry.config_path)
    finally:
        loop.unlink()
    assert result.returncode == 0, result.stderr
    assert "which this scan already read" in result.stderr


def test_delete_keeps_every_image_pullable(store: Store, tmp_path: Path) -> None:
    moved_target = store.other_volume / "moved"
    before = sorted(str(p.relative_to(moved_target)) for p in moved_target.rglob("*"))
    result = pruned("delete", "--registry-config", store.registry.config_path, "--grace", "0")
    assert result.returncode == 0, result.stderr
    for digest in store.orphans:
        assert not store.blob_dir(digest).exists(), digest
    # the sha512 link of a deleted blob went with it; the one an image needs stayed
    assert not store.foreign_orphan_link.exists()
    assert (store.foreign_link / "link").is_file()
    # nothing deleted through a link: the moved namespace is whole, both orphans kept
    assert sorted(str(p.relative_to(moved_target)) for p in moved_target.rglob("*")) == before
    assert (store.blob_dir(store.moved_orphan) / "data").is_file()
    assert (store.blob_dir(store.linked_orphan) / "data").is_file()
    # nor under the name a link points to: the alias would lose it
    assert (store.blob_dir(store.aliased_orphan) / "data").is_file()
    layers = store.v2 / "repositories/aliased/app/_layers/sha256"
    assert (layers / store.aliased_orphan[7:] / "link").is_file()
    assert "a symbolic link in the store points to" in result.stderr
    assert "kept: reached through the symbolic link" in result.stderr
    assert "never deleted through a link" in result.stderr
    for n, (name, ref) in enumerate(store.skopeo):
        skopeo_pull(store.registry.url, name, ref, tmp_path / f"after-{n}")
    client = RegistryClient(store.registry.url)
    for name, ref in store.api:
        assert api_pull(client, name, ref) >= 2
