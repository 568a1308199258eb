"""Untagged manifests and tag retention on a store the real registry wrote (issue 16).

One scenario (tests/harness/untagged_scenario.py): the checks run first, the deletes last.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import check_logged, pruned, would_delete
from tests.harness.daemon import Daemon
from tests.harness.images import RegistryClient, skopeo_pull
from tests.harness.registry import Registry, blobs_on_disk, running_registry
from tests.harness.untagged_scenario import UntaggedScenario, build_untagged

MANIFEST_LINE = re.compile(r"Would delete manifest: (\S+)@(sha256:[0-9a-f]{64})")
TAG_LINE = re.compile(r"(?:Would delete|Deleted) tag: (\S+):(\S+?)\"?(?:\s|$)")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, UntaggedScenario]]:
    with running_registry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry, build_untagged(registry)


def check(registry: Registry, *args: str) -> tuple[str, str]:
    """A check with grace 0, one text log line per item; (stdout, stderr)."""
    done = check_logged(registry.config_path, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, done.stderr


def dropped_tags(stderr: str) -> set[str]:
    return {f"{m.group(1)}:{m.group(2)}" for m in TAG_LINE.finditer(stderr)}


def test_untagged_check_is_distribution_but_the_two_documented_differences(
    store: tuple[Registry, UntaggedScenario],
) -> None:
    registry, sc = store
    stdout, stderr = check(registry, "--untagged")
    ours = would_delete(stderr)
    assert ours == sc.freed
    assert {(m.group(1), m.group(2)) for m in MANIFEST_LINE.finditer(stderr)} == set(sc.removed)
    assert not dropped_tags(stderr)  # no retention option: no tag is ever removed
    lines = stdout.splitlines()
    assert lines[:3] == [
        f"Would delete {len(sc.removed)} manifests",
        "Would delete 0 tags",
        f"Would delete {len(sc.freed)} blobs",
    ]
    # distribution 2.8's --delete-untagged frees all of ours, and exactly two things more,
    # which we keep: the tagged index's children (distribution#3178) and the kept image's
    # referrer chain (2.8 ignores subject)
    theirs = registry.garbage_collect(delete_untagged=True)
    assert ours <= theirs
    index_children_2_8_frees = theirs - ours - sc.referrer_chain
    referrer_chain_2_8_frees = theirs - ours - sc.index_children
    assert index_children_2_8_frees == sc.index_children
    assert referrer_chain_2_8_frees == sc.referrer_chain
    assert theirs - ours == sc.index_children | sc.referrer_chain
    # without --untagged nothing changes: old revisions are in use, the summary as before
    stdout, stderr = check(registry)
    assert would_delete(stderr) == registry.garbage_collect()
    assert stdout.splitlines()[0].startswith("Would delete ") and "manifests" not in stdout
    assert not MANIFEST_LINE.search(stderr)


@pytest.mark.parametrize(
    ("options", "dropped"),
    [
        (("--keep-last", "1"), {"rel:v1", "rel:v2"}),
        (("--keep-younger-than", "30d"), {"rel:v1"}),
        (("--keep-tags", "v[23]"), {"rel:v1"}),
        (("--keep-last", "1", "--keep-tags", "v2"), {"rel:v1"}),
        (("--keep-last", "0", "--repositories", "other*"), set()),
    ],
)
def test_retention_drops_exactly_the_tags_no_rule_keeps(
    store: tuple[Registry, UntaggedScenario], options: tuple[str, ...], dropped: set[str]
) -> None:
    registry, sc = store
    args = options if "--repositories" in options else (*options, "--repositories", "rel")
    stdout, stderr = check(registry, *args)
    assert dropped_tags(stderr) == dropped
    assert f"Would delete {len(dropped)} tags" in stdout.splitlines()
    removed = {(m.group(1), m.group(2)) for m in MANIFEST_LINE.finditer(stderr)}
    # a retention run is an untagged run too: the dropped tags' revisions go with the rest
    assert set(sc.removed) <= removed
    assert len(removed - set(sc.removed)) == len(dropped)
    assert {repo for repo, _digest in removed - set(sc.removed)} <= {"rel"}


def test_a_corrupt_tag_link_fails_the_untagged_run_closed(
    store: tuple[Registry, UntaggedScenario],
) -> None:
    registry, _sc = store
    link = registry.root / "docker/registry/v2/repositories/rel/_manifests/tags/v2/current/link"
    good, pushed = link.read_bytes(), link.stat().st_mtime
    link.write_bytes(b"sha256:not-a-digest")
    try:
        done = pruned("check", "--registry-config", registry.config_path, "--untagged")
    finally:
        link.write_bytes(good)
        os.utime(link, (pushed, pushed))  # its push time, for the retention runs after
    assert done.returncode == 1
    assert "tag link" in done.stderr and "corrupt" in done.stderr
    assert "Would delete" not in done.stdout


def test_api_untagged_run_lists_its_manifests_and_refuses_what_it_must(
    store: tuple[Registry, UntaggedScenario], tmp_path: Path
) -> None:
    registry, sc = store
    daemon = Daemon(registry.config_path, tmp_path / "state", "--grace", "0").start()
    try:
        status, doc = daemon.json(
            "POST", "/prune?mode=check&untagged=true&keep_last=1&repositories=rel&wait=true"
        )
        assert status == 200 and doc["state"] == "succeeded", doc
        assert doc["summary"]["manifests"] == len(sc.removed) + 2
        assert doc["summary"]["tags"] == 2
        assert doc["untagged"] is True and doc["retention"]["keep_last"] == 1
        _status, _headers, body = daemon.get(f"/runs/{doc['id']}/manifests")
        rows = [json.loads(line) for line in body.decode().splitlines()]
        assert {
            (r["repository"], r["digest"]): r["reason"] for r in rows if r["repository"] == "web"
        } == {key: reason for key, reason in sc.removed.items()}
        retained = [r for r in rows if r["repository"] == "rel"]
        assert sorted(tuple(r["tags"]) for r in retained) == [("v1",), ("v2",)]
        assert {r["reason"] for r in retained} == {"retention"}
        _status, _headers, text = daemon.get(f"/runs/{doc['id']}", headers={"Accept": "text/plain"})
        assert text.decode().splitlines()[:3] == [
            f"Would delete {len(sc.removed) + 2} manifests",
            "Would delete 2 tags",
            f"Would delete {doc['summary']['blobs']} blobs",
        ]
        # the cluster decides on OpenShift; online mode cannot keep a re-tag out
        status, doc = daemon.json("POST", "/prune?mode=check&untagged=true&source=openshift")
        assert status == 400 and "oc adm prune images" in doc["error"]
        status, doc = daemon.json("POST", "/prune?mode=delete&untagged=true&online=true")
        assert status == 409 and "online" in doc["error"] and "read-only" in doc["hint"]
        status, doc = daemon.json("POST", "/prune?mode=check&repositories=rel")
        assert status == 400 and "keep_last" in doc["error"]
        status, doc = daemon.json("POST", "/prune?mode=check&keep_tags=(")
        assert status == 400 and "regular expression" in doc["error"]
    finally:
        daemon.stop()
    refused = pruned("delete", "--registry-config", registry.config_path, "--untagged", "--online")
    assert refused.returncode == 2 and "online" in refused.stderr


def test_delete_untagged_then_retention_keeps_every_tag_and_referrer_pullable(
    store: tuple[Registry, UntaggedScenario], tmp_path: Path
) -> None:
    registry, sc = store
    client = RegistryClient(registry.url)
    before = blobs_on_disk(registry)
    registry.restart(read_only=True)
    done = pruned("delete", "--registry-config", registry.config_path, "--grace", "0", "--untagged")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[:3] == [
        f"Deleted {len(sc.removed)} manifests",
        "Deleted 0 tags",
        f"Deleted {len(sc.freed)} blobs",
    ]
    assert blobs_on_disk(registry) == before - sc.freed
    for n, (repo, ref) in enumerate([*sc.kept_tags, *sc.kept_referrers]):
        skopeo_pull(registry.url, repo, ref, tmp_path / f"pull-{n}")
    for repo, digest in sc.removed:
        assert client.request("GET", f"/v2/{repo}/manifests/{digest}", expect=(404,)).status == 404
    # nothing left for distribution, and no tag history entry names a removed revision
    assert registry.garbage_collect() == set()
    tags = registry.root / "docker/registry/v2/repositories/web/_manifests/tags"
    history = {p.name for p in tags.glob("*/index/sha256/*")}
    assert history and not history & {digest[7:] for _repo, digest in sc.removed}
    # retention: the three-tag repository keeps its newest tag; web is untouched
    done = pruned(
        "delete",
        "--registry-config",
        registry.config_path,
        "--grace",
        "0",
        "--keep-last",
        "1",
        "--repositories",
        "rel",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[:2] == ["Deleted 2 manifests", "Deleted 2 tags"]
    assert client.tags("rel") == ["v3"]
    assert sorted(client.tags("web")) == ["latest", "multi"]
    skopeo_pull(registry.url, "rel", "v3", tmp_path / "rel-v3")
    skopeo_pull(registry.url, "web", "latest", tmp_path / "web-latest")
    assert registry.garbage_collect() == set()
