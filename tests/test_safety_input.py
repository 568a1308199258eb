"""Hostile input: fuzzed manifests, climbing keys, symlinks out of the store, bad requests."""

from __future__ import annotations

import contextlib
import json
import os
import string
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import layout, manifests
from tests.conftest import pruned
from tests.harness.daemon import Daemon
from tests.harness.images import Scenario
from tests.harness.registry import Registry

HEX = st.text("0123456789abcdef", min_size=64, max_size=64)
DIGESTS = st.one_of(
    HEX.map(lambda h: f"sha256:{h}"),
    st.text(max_size=80),
    st.just("sha256:../../../etc/passwd"),
    st.just("sha512:" + "0" * 128),
    st.integers(),
    st.none(),
)
DESCRIPTOR = st.one_of(
    st.fixed_dictionaries({"digest": DIGESTS, "size": st.one_of(st.integers(), st.floats())}),
    st.integers(),
    st.text(max_size=10),
    st.none(),
)
JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
MANIFEST = st.fixed_dictionaries(
    {
        "schemaVersion": st.one_of(st.sampled_from([1, 2, 3, "2", None]), st.integers()),
        "mediaType": st.one_of(
            st.sampled_from([*manifests.IMAGE_MANIFESTS, *manifests.LISTS, manifests.OCI_ARTIFACT]),
            st.text(max_size=30),
        ),
    },
    optional={
        "config": DESCRIPTOR,
        "layers": st.one_of(st.lists(DESCRIPTOR, max_size=5), JSONISH),
        "manifests": st.one_of(st.lists(DESCRIPTOR, max_size=5), JSONISH),
        "blobs": st.one_of(st.lists(DESCRIPTOR, max_size=5), JSONISH),
        "fsLayers": st.one_of(
            st.lists(st.fixed_dictionaries({"blobSum": DIGESTS}), max_size=5), JSONISH
        ),
        "subject": DESCRIPTOR,
    },
)


@settings(max_examples=1500, deadline=None)
@given(MANIFEST)
def test_fuzzed_manifests_parse_or_refuse(doc: dict) -> None:
    try:
        refs = manifests.parse(json.dumps(doc).encode())
    except manifests.ManifestError:
        return
    for digest in [*refs.blobs, *refs.children]:
        assert isinstance(digest, bytes) and len(digest) == 32


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_escape_as_another_error(data: bytes) -> None:
    with contextlib.suppress(manifests.ManifestError):
        manifests.parse(data)


def test_deeply_nested_json_is_refused() -> None:
    for doc in (b"[" * 200_000, b'{"a":' * 200_000):
        with pytest.raises(manifests.ManifestError):
            manifests.parse(doc)


SEGMENT = st.one_of(
    st.sampled_from(["..", ".", "", "_layers", "_manifests", "sha256"]),
    st.text(string.ascii_lowercase + "./_-", max_size=8),
)


@settings(max_examples=2000, deadline=None)
@given(st.lists(SEGMENT, min_size=1, max_size=9), HEX)
def test_classified_keys_never_name_a_climbing_repository(parts: list[str], hexd: str) -> None:
    for tail in (f"_layers/sha256/{hexd}/link", f"_manifests/revisions/sha256/{hexd}/link"):
        kind = layout.classify_repo_key("repositories/" + "/".join(parts) + "/" + tail)
        if kind is not None:
            assert all(p not in ("", ".", "..") for p in kind.repository.split("/"))
            # a name with an "_uploads" component is an upload's file, which names no digest
            if kind.kind in ("revision", "layer"):
                assert layout.is_hex(kind.digest_hex)


def _v2(registry: Registry) -> Path:
    return registry.root / "docker/registry/v2"


def test_symlinks_out_of_the_store_are_never_deleted_through(
    fresh: tuple[Registry, Scenario], tmp_path: Path
) -> None:
    registry, scenario = fresh
    outside = tmp_path / "outside"
    hexd = "e" * 64
    (outside / "blob" / hexd).mkdir(parents=True)
    (outside / "blob" / hexd / "data").write_bytes(b"precious")
    (outside / "repo" / "_layers").mkdir(parents=True)
    v2 = _v2(registry)
    # a blob prefix and a blob directory that are links to the outside
    (v2 / "blobs/sha256/ee").mkdir(exist_ok=True)
    os.symlink(outside / "blob" / hexd, v2 / "blobs/sha256/ee" / hexd)
    os.symlink(outside / "blob", v2 / "blobs/sha256/zz")
    # a blob whose data file is a link to an outside file
    linked = "d" * 64
    (v2 / "blobs/sha256/dd" / linked).mkdir(parents=True)
    os.symlink(outside / "blob" / hexd / "data", v2 / "blobs/sha256/dd" / linked / "data")
    # a repository that is a link to the outside
    os.symlink(outside / "repo", v2 / "repositories/evil")
    registry.restart(read_only=True)
    result = pruned(
        "delete",
        "--registry-config",
        registry.config_path,
        "--grace",
        "0",
        "--upload-max-age",
        "0",
    )
    assert result.returncode == 0, result.stderr
    assert (outside / "blob" / hexd / "data").read_bytes() == b"precious"
    assert (outside / "repo" / "_layers").is_dir()
    assert os.path.islink(v2 / "repositories/evil")
    on_disk = {"sha256:" + p.parent.name for p in (v2 / "blobs/sha256").glob("*/*/data")}
    assert scenario.in_use <= on_disk


@pytest.mark.parametrize(
    "content", ["../../../../etc/passwd", "sha256:../../x", "sha256:" + "A" * 64, "\x00" * 10]
)
def test_link_contents_that_climb_fail_closed(
    shared: tuple[Registry, Scenario], tmp_path: Path, content: str
) -> None:
    registry, scenario = shared
    image = next(i for i in scenario.images if i.repository == "other" and not i.deleted)
    link = _v2(registry) / "repositories/other/_manifests/revisions/sha256" / image.digest[7:]
    original = (link / "link").read_bytes()
    try:
        (link / "link").write_text(content)
        result = pruned("check", "--registry-config", registry.config_path, "--grace", "0")
        assert result.returncode == 1 and "is corrupt" in result.stderr
    finally:
        (link / "link").write_bytes(original)


@pytest.fixture(scope="module")
def api(
    shared: tuple[Registry, Scenario], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    registry, _scenario = shared
    d = Daemon(registry.config_path, tmp_path_factory.mktemp("state")).start()
    yield d
    d.stop()


QUERY = st.dictionaries(
    st.one_of(st.sampled_from(["mode", "grace", "wait", "online", "source"]), st.text(max_size=20)),
    st.one_of(
        st.sampled_from(["check", "delete", "true", "1h", "-1s", "9" * 400]), st.text(max_size=300)
    ),
    max_size=5,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(QUERY, st.sampled_from(["POST", "GET"]), st.text(max_size=40))
def test_malformed_requests_never_break_the_server(
    api: Daemon, query: dict[str, str], method: str, run_id: str
) -> None:
    q = urllib.parse.urlencode(query)
    status, _h, body = api.request(method, f"/prune?{q}")
    assert status in (200, 202, 400, 405, 409), (status, body)
    if status in (400, 405, 409):
        assert "error" in json.loads(body)
    if status == 202:
        api.wait_done(json.loads(body)["id"])
    status, _h, _body = api.request("GET", "/runs/" + urllib.parse.quote(run_id, safe=""))
    assert status in (200, 404)
    status, _h, _body = api.request("GET", "/" + "x" * 9000)
    assert status in (404, 414, 400)
    assert api.json("GET", "/healthz") == (200, {"status": "ok"})
