"""Verify and recover with the openshift source: a real registry's store, the fake API."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import yaml

from tests.harness.daemon import Daemon
from tests.harness.fake_openshift import (
    OCI_MANIFEST,
    PRUNER_USER,
    FakeOpenShift,
    fake_digest,
    make_image,
    make_image_stream,
)
from tests.harness.openshift_scenario import Pushed, cluster_for, run_cli
from tests.harness.registry import Registry

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests" / "openshift"


def _remove_blob(registry: Registry, digest: str) -> None:
    hexdigest = digest.partition(":")[2]
    shutil.rmtree(registry.root / f"docker/registry/v2/blobs/sha256/{hexdigest[:2]}/{hexdigest}")


async def test_verify_reports_images_missing_blobs_and_tags_naming_deleted_images(
    openshift_store: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, images = openshift_store
    cluster = cluster_for(images, skip=set())
    async with FakeOpenShift(cluster) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        code, out, err = await run_cli(registry, "verify", kubeconfig=kubeconfig)
        assert code == 0, out + err
        clean = out.splitlines()
        assert clean[-1].endswith(": 0 broken") and not clean[:-1], out

        # an image whose blobs were never in this store (the registry lost them)
        ghost, ghost_layer = fake_digest("ghost"), fake_digest("ghost layer")
        cluster.add_image(
            make_image(ghost, layers=[ghost_layer], config=fake_digest("ghost config"))
        )
        # an image imported from elsewhere, not managed: its blobs are not ours to check
        foreign = make_image(
            fake_digest("imported"),
            layers=[fake_digest("imported layer")],
            config=fake_digest("imported config"),
        )
        del foreign["metadata"]["annotations"]["openshift.io/image.managed"]
        cluster.add_image(foreign)
        # app1's own layer is gone from the store
        app1 = images["app1"]
        own = app1.manifest.layers[-1]
        _remove_blob(registry, own)
        # a stream tag whose history names an Image deleted from the cluster
        deleted = fake_digest("deleted image")
        web = images["web"]
        cluster.add_stream(
            make_image_stream("ns1", "web", {"latest": [web.manifest.digest], "old": [deleted]})
        )
        code, out, err = await run_cli(registry, "verify", kubeconfig=kubeconfig)
    assert code == 1, out + err
    lines = out.splitlines()
    assert "error: verification found 3 broken images" in err, err
    assert (
        f'Broken imagestream tag "ns1/app:v1" in position 0: image blob "{own}": unknown blob'
        in lines
    ), out
    assert (
        f'Broken imagestream tag "ns1/web:old" in position 0: image "{deleted}": '
        f'images.image.openshift.io "{deleted}" not found'
    ) in lines, out
    assert f'Broken image "{ghost}": image "{ghost}": unknown blob' in lines, out
    assert f'Broken image "{ghost}": image blob "{ghost_layer}": unknown blob' in lines, out
    assert not any(fake_digest("imported") in line for line in lines), out
    # the managed Image objects, and the deleted one a tag names; not the imported one
    checked = sum(1 for i in cluster.images.values() if i is not foreign) + 1
    assert lines[-1] == f"Checked {checked} images: 3 broken", out


async def test_recover_lists_then_registers_lost_manifests(
    openshift_store: tuple[Registry, dict[str, Pushed]], tmp_path: Path
) -> None:
    registry, images = openshift_store
    # app2's Image object is gone; ns2/gone's stream exists with no tag at all
    cluster = cluster_for(images, skip={"app2", "gone"})
    cluster.add_stream(make_image_stream("ns2", "gone", {}))
    app2, gone = images["app2"], images["gone"]
    lost = {("ns1/app", app2.manifest.digest), ("ns2/gone", gone.manifest.digest)}

    def words(repo: str, digest: str) -> str:
        tag = "lost-found-" + digest.partition(":")[2]
        return f'Would add image "{digest}" to imagestream "{repo}" with tag "{tag}"'

    async with FakeOpenShift(cluster) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        code, out, err = await run_cli(registry, "recover", kubeconfig=kubeconfig)
        assert code == 0, out + err
        would = [line for line in out.splitlines() if line.startswith("Would add image")]
        assert sorted(would) == sorted(words(r, d) for r, d in lost), out
        assert not cluster.mappings  # the check form changes nothing

        # the same through the daemon: the text answer in the original words, /lost-found
        daemon = Daemon(
            registry.config_path,
            tmp_path / "state",
            "--source",
            "openshift",
            "--kubeconfig",
            str(kubeconfig),
        )
        await asyncio.to_thread(daemon.start)
        try:
            status, doc = await asyncio.to_thread(
                daemon.json, "GET", "/prune?mode=recover&wait=true"
            )
            assert status == 200 and doc["state"] == "succeeded", doc
            assert doc["recovery"]["lost"] == 2 and not doc["recovery"]["applied"]
            _s, _h, text = await asyncio.to_thread(
                daemon.get, f"/runs/{doc['id']}", headers={"Accept": "text/plain"}
            )
            assert sorted(text.decode().splitlines()[:2]) == sorted(would), text
            _s, _h, body = await asyncio.to_thread(daemon.get, f"/runs/{doc['id']}/lost-found")
            rows = [json.loads(line) for line in body.splitlines()]
            assert {(r["repository"], r["digest"]) for r in rows} == lost
            assert {r["tag"] for r in rows} == {"lost-found-" + d[7:] for _r, d in lost}
            # applying needs POST
            status, _h, _b = await asyncio.to_thread(daemon.get, "/prune?mode=recover&apply=true")
            assert status == 405
            assert not cluster.mappings
        finally:
            daemon.stop()

        code, out, err = await run_cli(registry, "recover", "--apply", kubeconfig=kubeconfig)
        assert code == 0, out + err
        posted = {
            (
                f"{m['metadata']['namespace']}/{m['metadata']['name']}",
                m["image"]["metadata"]["name"],
            )
            for m in cluster.mappings
        }
        assert posted == lost
        mapping = next(m for m in cluster.mappings if m["metadata"]["name"] == "app")
        assert mapping["tag"] == "lost-found-" + app2.manifest.digest.partition(":")[2]
        image = mapping["image"]
        assert image["dockerImageManifestMediaType"] == OCI_MANIFEST
        assert image["dockerImageManifest"].encode() == app2.manifest.data
        assert [layer["name"] for layer in image["dockerImageLayers"]] == list(app2.manifest.layers)
        assert image["metadata"]["annotations"]["openshift.io/image.managed"] == "true"
        assert image["dockerImageReference"].endswith(f"/ns1/app@{app2.manifest.digest}")
        assert "dockerImageConfig" in image

        # registered, they are found again: nothing left to recover
        code, out, err = await run_cli(registry, "recover", kubeconfig=kubeconfig)
        assert code == 0, out + err
        assert "Would add image" not in out and "Would add 0 images" in out, out

        # with the base ClusterRole only, apply fails and names what to grant
        app2_image = cluster.images.pop(app2.manifest.digest)  # gone again
        cluster.rbac = True
        for verb, resource in _grants(MANIFESTS / "base" / "rbac.yaml"):
            cluster.allow(PRUNER_USER, verb, resource)
        code, out, err = await run_cli(registry, "recover", "--apply", kubeconfig=kubeconfig)
        assert code == 1, out + err
        assert "create imagestreammappings.image.openshift.io" in err, err
        assert "components/recover/rbac.yaml" in err
        # with the optional one, it goes through
        for verb, resource in _grants(MANIFESTS / "components" / "recover" / "rbac.yaml"):
            cluster.allow(PRUNER_USER, verb, resource)
        code, out, err = await run_cli(registry, "recover", "--apply", kubeconfig=kubeconfig)
        assert code == 0, out + err
        assert (
            cluster.images[app2.manifest.digest]["metadata"]["name"]
            == app2_image["metadata"]["name"]
        )


def _grants(path: Path) -> set[tuple[str, str]]:
    """(verb, resource.group) of the ClusterRole in one of manifests/openshift's files."""
    (role,) = [d for d in yaml.safe_load_all(path.read_text()) if d["kind"] == "ClusterRole"]
    return {
        (verb, f"{resource}.{group}" if group else resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
