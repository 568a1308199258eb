"""The real-component harness works: docker-registry 2.8, real pushes, skopeo pulls."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.harness.images import (
    DOCKER_LAYER,
    DOCKER_SCHEMA1_SIGNED,
    RegistryClient,
    RegistryHTTPError,
    Scenario,
    build_scenario,
    plant_schema1,
    random_layer,
    skopeo_pull,
)
from tests.harness.registry import Registry, running_registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def scenario(registry: Registry) -> Scenario:
    return build_scenario(registry)


def test_scenario_builds(registry: Registry, scenario: Scenario) -> None:
    client = RegistryClient(registry.url)
    assert sorted(client.catalog()) == sorted(scenario.repositories)
    for repo, ref in scenario.kept:
        client.get_manifest(repo, ref)
    for repo, digest in scenario.deleted_manifests:
        with pytest.raises(RegistryHTTPError) as info:
            client.get_manifest(repo, digest)
        assert info.value.status == 404
    assert "doomed" not in client.tags("other")
    # distribution 2.8 stores OCI manifests byte for byte: artifactType and subject survive.
    artifact = next(i for i in scenario.images if b'"subject"' in i.manifest.data)
    body = json.loads(client.get_manifest("app", artifact.digest).body)
    assert body["subject"]["digest"] == next(i.digest for i in scenario.images if i.tag == "v1")
    assert body["artifactType"] == "application/vnd.example.sbom.v1+json"
    assert scenario.schema1
    resp = client.get_manifest("other", "schema1")
    assert resp.headers["Content-Type"] == DOCKER_SCHEMA1_SIGNED
    v2 = registry.root / "docker/registry/v2"
    for repo, uuid in scenario.uploads:
        assert (v2 / "repositories" / repo / "_uploads" / uuid / "startedat").is_file()
    on_disk = {"sha256:" + p.parent.name for p in (v2 / "blobs/sha256").glob("*/*/data")}
    assert on_disk == scenario.pushed


def test_garbage_collect_dry_run_finds_exactly_the_orphans(
    registry: Registry, scenario: Scenario
) -> None:
    # distribution 2.8 agrees with the expectation as built: the deleted manifest's own blob,
    # config and unshared layers, plus blobs uploaded without a manifest. Untagged revisions
    # (a moved tag, index children, the artifact) are kept, and so are their blobs.
    assert registry.garbage_collect(dry_run=True) == scenario.expected_orphans
    out = registry.garbage_collect_output()
    assert f"{len(scenario.expected_orphans)} blobs and 0 manifests eligible for deletion" in out


def test_garbage_collect_delete_untagged(registry: Registry, scenario: Scenario) -> None:
    # Documents distribution's --delete-untagged: untagged manifests and blobs only they hold
    # go, and for index children only config/layers do (the index still marks the child).
    eligible = registry.garbage_collect(dry_run=True, delete_untagged=True)
    assert eligible == scenario.expected_orphans | scenario.untagged_eligible


def test_kept_references_pull_with_skopeo(
    registry: Registry, scenario: Scenario, tmp_path: Path
) -> None:
    for i, (repo, ref) in enumerate(scenario.kept):
        dest = tmp_path / str(i)
        skopeo_pull(registry.url, repo, ref, dest)
        assert (dest / "manifest.json").is_file()


def test_deleted_manifest_does_not_pull(
    registry: Registry, scenario: Scenario, tmp_path: Path
) -> None:
    repo, digest = scenario.deleted_manifests[0]
    with pytest.raises(RuntimeError, match="manifest unknown"):
        skopeo_pull(registry.url, repo, digest, tmp_path / "gone")


def test_plant_schema1_matches_distribution_layout(tmp_path: Path) -> None:
    rng = random.Random(7)
    layers = [random_layer(rng, media_type=DOCKER_LAYER) for _ in range(2)]
    with running_registry(tmp_path / "reg") as reg:
        manifest = plant_schema1(reg.root, "legacy/app", "v1", layers)
        resp = RegistryClient(reg.url).get_manifest("legacy/app", "v1")
        assert resp.headers["Docker-Content-Digest"] == manifest.digest
        skopeo_pull(reg.url, "legacy/app", "v1", tmp_path / "pulled")
        assert reg.garbage_collect() == set()


def test_garbage_collect_deletes_and_read_only_restart(tmp_path: Path) -> None:
    rng = random.Random(9)
    with running_registry(tmp_path / "reg") as reg:
        client = RegistryClient(reg.url)
        orphans = set(client.upload_orphan_blobs("scratch", 2, rng))
        reg.restart(read_only=True)
        with pytest.raises(RegistryHTTPError) as info:
            client.upload_blob("scratch", random_layer(rng))
        assert info.value.status == 405
        conf = yaml.safe_load(reg.config_path.read_text())
        assert conf["storage"]["maintenance"]["readonly"] == {"enabled": True}
        assert reg.garbage_collect(dry_run=False) == orphans
        assert reg.garbage_collect() == set()
        reg.restart(read_only=False)
        client.upload_blob("scratch", random_layer(rng))


def test_s3_config_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s3 = {
        "bucket": "b",
        "region": "us-east-1",
        "regionendpoint": "http://127.0.0.1:9",
        "accesskey": "a",
        "secretkey": "s",
        "rootdirectory": "/registry",
    }
    reg = Registry(tmp_path, s3=s3, env={"REGISTRY_LOG_LEVEL": "info"})
    storage = reg.config()["storage"]
    assert storage["s3"] == {**s3, "secure": False, "forcepathstyle": True, "v4auth": True}
    assert storage["delete"] == {"enabled": True}
    assert storage["maintenance"] == {"uploadpurging": {"enabled": False}}
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("REGISTRY_STORAGE", "filesystem")
    env = reg.child_env()
    assert "AWS_CA_BUNDLE" not in env
    assert "REGISTRY_STORAGE" not in env
    assert env["REGISTRY_LOG_LEVEL"] == "info"


def test_no_test_or_benchmark_finds_our_script_through_path() -> None:
    """Our own executables are found next to the interpreter: the README's commands never
    put .venv/bin on PATH, and a leftover install there would be tested instead (issue 22)."""
    root = Path(__file__).resolve().parent.parent
    through_path = re.compile(
        r"""which\(\s*["']registry-pruned["']|\[\s*["']registry-pruned["']\s*,"""
    )
    found = [
        f"{path.relative_to(root)}:{n}"
        for folder in ("tests", "bench")
        for path in sorted((root / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if through_path.search(line) and path != Path(__file__).resolve()
    ]
    assert found == []
