"""Pure pieces: layout, manifests, config, units, summary words."""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path

import pytest

from daemon import layout, manifests
from daemon.config import ConfigError, load_settings, parse_duration
from daemon.cpus import cgroup_quota, usable_cpus
from daemon.prune import CHECK, DELETE, Candidate, Summary, parse_started_at
from daemon.report import Ending, summary_lines
from daemon.units import bytes_size, duration_text

H1, H2, H3 = "a" * 64, "b" * 64, "c" * 64


def test_digest_round_trip_and_rejects() -> None:
    raw = layout.parse_digest(f"sha256:{H1}\n")
    assert len(raw) == 32 and layout.format_digest(raw) == f"sha256:{H1}"
    for bad in ("sha256:abc", f"sha512:{H1}", H1, f"sha256:{H1.upper()}", "sha256:../../etc"):
        with pytest.raises(layout.InvalidDigest):
            layout.parse_digest(bad)


def test_classify_keys_with_multi_component_names() -> None:
    rev = layout.classify_repo_key(f"repositories/a/b/c/_manifests/revisions/sha256/{H1}/link")
    assert rev == layout.RepoKey("revision", "a/b/c", digest_hex=H1)
    tag = layout.classify_repo_key("repositories/app/_manifests/tags/v1/current/link")
    assert tag is not None and (tag.kind, tag.tag) == ("tag_current", "v1")
    layer = layout.classify_repo_key(f"repositories/ns/app/_layers/sha256/{H2}/link")
    assert layer is not None and (layer.kind, layer.repository) == ("layer", "ns/app")
    up = layout.classify_repo_key("repositories/app/_uploads/u-1/startedat")
    assert up is not None and (up.kind, up.upload) == ("upload_startedat", "u-1")
    assert layout.classify_repo_key("repositories/app/_layers/sha256/zz/link") is None
    assert layout.classify_repo_key("repositories/_manifests/revisions/sha256/x/link") is None


def test_repository_names() -> None:
    assert layout.is_repository_name("ns/app") and layout.is_repository_name("a/b-c/d_e.f")
    for bad in ("", "../x", "a//b", "A/b", "a/../b", "/a"):
        assert not layout.is_repository_name(bad)


def _d(h: str) -> dict[str, object]:
    return {"digest": f"sha256:{h}", "size": 1, "mediaType": "x"}


def _j(h: str) -> str:
    return json.dumps(_d(h))


def test_parse_every_media_type() -> None:
    schema2 = {
        "schemaVersion": 2,
        "mediaType": manifests.DOCKER_V2,
        "config": _d(H1),
        "layers": [_d(H2), _d(H3)],
    }
    refs = manifests.parse(json.dumps(schema2).encode())
    assert refs.blobs == [bytes.fromhex(h) for h in (H1, H2, H3)] and not refs.children
    oci = {"schemaVersion": 2, "config": _d(H1), "layers": [_d(H2)]}  # no mediaType
    assert manifests.parse(json.dumps(oci).encode()).kind == manifests.OCI_MANIFEST
    index = {"schemaVersion": 2, "manifests": [_d(H1), _d(H2)]}
    refs = manifests.parse(json.dumps(index).encode())
    assert refs.kind == manifests.OCI_INDEX and len(refs.children) == 2
    schema1 = {"schemaVersion": 1, "fsLayers": [{"blobSum": f"sha256:{H3}"}], "signatures": []}
    assert manifests.parse(json.dumps(schema1).encode()).blobs == [bytes.fromhex(H3)]
    foreign = {"schemaVersion": 2, "config": _d(H1), "layers": [{"digest": "sha512:" + "0" * 128}]}
    assert manifests.parse(json.dumps(foreign).encode()).foreign_blobs


def _spellings(key: str) -> list[str]:
    """``key`` in other cases, as Go's encoding/json still matches it (long s included)."""
    out = {key.upper(), key.lower(), key[0].upper() + key[1:], key.swapcase()}
    if "s" in key.lower():
        out.add(key.replace("s", "\u017f", 1).replace("S", "\u017f", 1))
    out.discard(key)
    return sorted(out)


D512 = "sha512:" + "d" * 128
D384 = "sha384:" + "e" * 96


@pytest.mark.parametrize(
    ("key", "doc", "expect"),
    [
        ("schemaVersion", {"config": _d(H1), "layers": [_d(H2)]}, "blobs"),
        ("mediaType", {"config": _d(H1), "layers": [_d(H2)]}, "blobs"),
        ("config", {"layers": [_d(H2)]}, "blobs"),
        ("layers", {"config": _d(H1)}, "blobs"),
        ("manifests", {}, "children"),
        ("blobs", {}, "artifact"),
        ("digest", {}, "digest"),
        ("subject", {"config": _d(H1), "layers": [_d(H2)]}, "subject"),
        ("fsLayers", {}, "schema1"),
        ("blobSum", {}, "schema1"),
    ],
)
def test_every_key_read_matches_in_any_case_as_go_does(key: str, doc: dict, expect: str) -> None:
    for spelling in _spellings(key):

        def k(name: str, spelling: str = spelling) -> str:
            return spelling if name == key else name

        if expect == "children":
            full = {k("schemaVersion"): 2, k("manifests"): [_d(H1)]}
        elif expect == "artifact":
            full = {"schemaVersion": 2, "mediaType": manifests.OCI_ARTIFACT, k("blobs"): [_d(H3)]}
        elif expect == "digest":
            desc = {"mediaType": "x", "size": 1, k("digest"): f"sha256:{H2}"}
            full = {"schemaVersion": 2, "config": _d(H1), "layers": [desc]}
        elif expect == "schema1":
            full = {"schemaVersion": 1, k("fsLayers"): [{k("blobSum"): f"sha256:{H3}"}]}
        else:
            full = {"schemaVersion": 2, "mediaType": manifests.OCI_MANIFEST, **doc}
            full = {(k(name)): value for name, value in full.items()}
            full[k(key)] = {
                "schemaVersion": 2,
                "mediaType": manifests.DOCKER_V2,  # read: Docker, not OCI by default
                "config": _d(H1),
                "layers": [_d(H2)],
                "subject": {"mediaType": "x", "size": 1, "digest": D512},
            }[key]
        refs = manifests.parse(json.dumps(full).encode())
        if expect == "children":
            assert refs.children == [bytes.fromhex(H1)], spelling
        elif expect == "artifact" or expect == "schema1":
            assert refs.blobs == [bytes.fromhex(H3)], spelling
        elif expect == "subject":
            assert refs.subject == D512, spelling
        else:
            assert refs.blobs == [bytes.fromhex(H1), bytes.fromhex(H2)], spelling
            if key == "mediaType":
                assert refs.kind == manifests.DOCKER_V2, spelling


def test_the_issues_oci_manifest_with_layers_capitalised_marks_its_layer() -> None:
    doc = {"schemaVersion": 2, "mediaType": manifests.OCI_MANIFEST, "config": _d(H1)}
    doc["Layers"] = [_d(H2)]
    assert manifests.parse(json.dumps(doc).encode()).blobs == [bytes.fromhex(H1), bytes.fromhex(H2)]


def _raw(*pairs: tuple[str, str]) -> str:
    """A JSON object written pair by pair (repeated keys kept, in order); values are JSON."""
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in pairs) + "}"


@pytest.mark.parametrize(
    ("layers", "expect"),
    [
        # the last match wins, whatever the spelling, in the document's order
        ([("layers", H2), ("Layers", H3)], H3),
        ([("Layers", H2), ("layers", H3)], H3),
        ([("LAYERS", H3), ("layers", H3), ("Layers", H2)], H2),
        # a repeated exact key after a case variant: a dict keeps its first place, Go the last
        ([("layers", H3), ("Layers", H3), ("layers", H2)], H2),
    ],
)
def test_keys_that_fold_together_take_the_last_as_go_does(
    layers: list[tuple[str, str]], expect: str
) -> None:
    pairs = [(key, f"[{_j(h)}]") for key, h in layers]
    doc = _raw(("schemaVersion", "2"), ("config", _j(H1)), *pairs)
    assert manifests.parse(doc.encode()).blobs == [bytes.fromhex(H1), bytes.fromhex(expect)]


def test_digest_keys_that_fold_together_take_the_last() -> None:
    layer = _raw(
        *((key, f'"sha256:{h}"') for key, h in (("digest", H1), ("Digest", H2), ("digest", H3)))
    )
    doc = _raw(("schemaVersion", "2"), ("config", _j(H1)), ("layers", f"[{layer}]"))
    assert manifests.parse(doc.encode()).blobs == [bytes.fromhex(H1), bytes.fromhex(H3)]


def test_keys_go_would_not_match_are_not_read() -> None:
    # a zero-width space, a Turkish dotted capital I: no simple fold reaches "layers"
    for key in ("layers\u200b", "layer", "Layer\u0130"):
        doc = {"schemaVersion": 2, "config": _d(H1), key: [_d(H2)]}
        assert manifests.parse(json.dumps(doc).encode()).blobs == [bytes.fromhex(H1)]
    assert manifests._fold("\u212a") == "k"  # the Kelvin sign folds to k, as in Go


def test_sha384_and_sha512_references_are_returned_for_resolving() -> None:
    doc = {
        "schemaVersion": 2,
        "config": {"digest": D384},
        "layers": [{"digest": D512}, _d(H2)],
        "subject": {"digest": D384},
    }
    refs = manifests.parse(json.dumps(doc).encode())
    assert refs.blobs == [bytes.fromhex(H2)] and refs.foreign_blobs == [D384, D512]
    assert refs.subject == D384
    index = {"schemaVersion": 2, "manifests": [{"digest": D512}, {"digest": D384}, _d(H1)]}
    refs = manifests.parse(json.dumps(index).encode())
    assert refs.children == [bytes.fromhex(H1)] and refs.foreign_children == [D512, D384]
    schema1 = {"schemaVersion": 1, "fsLayers": [{"blobSum": D512}]}
    assert manifests.parse(json.dumps(schema1).encode()).foreign_blobs == [D512]
    for bad in ("sha512:" + "d" * 127, "sha384:" + "E" * 96, "md5:" + "0" * 32):
        doc = {"schemaVersion": 2, "config": _d(H1), "layers": [{"digest": bad}]}
        with pytest.raises(manifests.ManifestError):
            manifests.parse(json.dumps(doc).encode())


def test_foreign_layer_links_are_known_keys() -> None:
    key = f"repositories/ns/app/_layers/sha512/{'d' * 128}/link"
    assert layout.classify_repo_key(key) == layout.RepoKey(
        "foreign_layer", "ns/app", digest_hex="sha512:" + "d" * 128
    )
    from daemon.inventory import Inventory

    inventory = Inventory()
    inventory.add_keys([key, f"repositories/ns/app/_layers/sha384/{'e' * 96}/link"])
    assert inventory.unknown == 0
    assert inventory.repositories["ns/app"].foreign_layers == [D512, D384]
    inventory.add_keys([f"repositories/ns/app/_layers/sha512/{'d' * 127}/link"])
    assert inventory.unknown == 1


@pytest.mark.parametrize(
    "doc",
    [
        b"{not json",
        b"[]",
        b'{"schemaVersion": 3}',
        b'{"schemaVersion": 2, "mediaType": "text/html"}',
        b'{"schemaVersion": 2, "mediaType": "' + manifests.DOCKER_V2.encode() + b'"}',
        b'{"schemaVersion": 2, "config": {"digest": "sha256:../../x"}, "layers": []}',
        b'{"schemaVersion": 2, "manifests": [42]}',
        b'{"schemaVersion": 1, "fsLayers": "x"}',
    ],
)
def test_parse_refuses_what_it_cannot_read(doc: bytes) -> None:
    with pytest.raises(manifests.ManifestError):
        manifests.parse(doc)


def test_durations() -> None:
    assert parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    assert parse_duration("0") == 0 and parse_duration("2d") == 172800
    for bad in ("", "1", "h", "1y", "-1h", "1h x"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_config_file_env_and_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yml"
    cfg.write_text(
        "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: /data\n"
        "  maintenance:\n    readonly:\n      enabled: true\n"
    )
    settings = load_settings(cfg, env={})
    assert settings.storage.driver == "filesystem" and settings.storage.rootdirectory == "/data"
    assert settings.registry_read_only
    env = {
        "REGISTRY_STORAGE": "s3",
        "REGISTRY_STORAGE_S3_BUCKET": "b",
        "REGISTRY_STORAGE_S3_REGIONENDPOINT": "http://127.0.0.1:1",
        "REGISTRY_STORAGE_S3_ROOTDIRECTORY": "/reg",
    }
    s3 = load_settings(cfg, env=env)
    assert s3.storage.driver == "s3" and s3.storage.s3 is not None
    assert (s3.storage.s3.bucket, s3.storage.rootdirectory) == ("b", "reg")
    env_only = load_settings(None, env={**env, "REGISTRY_CONFIGURATION_PATH": str(tmp_path / "x")})
    assert env_only.storage.driver == "s3"
    plain = tmp_path / "plain.yml"
    plain.write_text("storage:\n  filesystem:\n    rootdirectory: /data\n")
    assert not load_settings(plain, env={}).registry_read_only
    ro = load_settings(plain, env={"REGISTRY_STORAGE_MAINTENANCE_READONLY": '{"enabled": true}'})
    assert ro.registry_read_only
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yml", env={})
    (tmp_path / "bad.yml").write_text("storage: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yml"):
        load_settings(tmp_path / "bad.yml", env={})
    (tmp_path / "two.yml").write_text("storage:\n  filesystem: {}\n  s3: {bucket: b}\n")
    with pytest.raises(ConfigError, match="exactly one driver"):
        load_settings(tmp_path / "two.yml", env={})


def test_sizes_and_summary_words() -> None:
    assert bytes_size(3044220928) == "2.835 GiB" and bytes_size(0) == "0 B"
    assert bytes_size(1536) == "1.5 KiB"
    check = summary_lines(CHECK, Summary(blobs=13374, bytes=3044220928))
    assert check == [
        "Would delete 13374 blobs",
        "Would free up 2.835 GiB of disk space",
        "Use mode=delete to actually delete the data",
    ]
    assert summary_lines(DELETE, Summary(blobs=13374, bytes=3044220928)) == [
        "Deleted 13374 blobs",
        "Freed up 2.835 GiB of disk space",
    ]


def test_summary_plurals_and_what_was_kept() -> None:
    limits = Ending(grace=3600, upload_max_age=86400)
    one = Summary(blobs=1, repositories=1, manifest_links=1, uploads=1, too_young=1, uploads_kept=1)
    assert summary_lines(DELETE, one, limits) == [
        "Deleted 1 blobs",  # the original pruner's words, which scripts parse
        "Freed up 0 B of disk space",
        "Deleted 1 repository",
        "Deleted 1 manifest link",
        "Deleted 1 stale upload",
        "Kept 1 blob younger than the 1h grace period",
        "Kept 1 upload younger than the upload age limit (--upload-max-age 24h)",
    ]
    two = Summary(repositories=2, manifest_links=2, uploads=2, too_young=2)
    assert summary_lines(CHECK, two, Ending(grace=1800))[2:] == [
        "Would delete 2 repositories",
        "Would delete 2 manifest links",
        "Would delete 2 stale uploads",
        "Kept 2 blobs younger than the 30m grace period",
        "Use mode=delete to actually delete the data",
    ]


def test_summary_of_runs_that_did_not_finish() -> None:
    stopped_early = Ending(run_id="r1", state="stopped", phase="mark")
    assert summary_lines(CHECK, Summary(), stopped_early) == [
        "Run r1 stopped during mark: nothing was decided"
    ]
    stopped = Ending(run_id="r1", state="stopped", phase="sweep")
    assert summary_lines(CHECK, Summary(blobs=3, bytes=3072), stopped) == [
        "Would delete 3 blobs",
        "Would free up 3 KiB of disk space",
        "Run r1 stopped during sweep: counts are partial",
    ]
    failed = Ending(run_id="r2", state="failed", phase="delete", error="disk gone")
    assert summary_lines(DELETE, Summary(blobs=2, bytes=2), failed)[-1] == (
        "Run r2 failed during delete: counts are partial (disk gone)"
    )
    failed_early = Ending(run_id="r3", state="failed", phase="mark", error="bad manifest")
    assert summary_lines(CHECK, Summary(), failed_early) == [
        "Run r3 failed during mark: nothing was decided (bad manifest)"
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (45, "45s"),
        (1800, "30m"),
        (3600, "1h"),
        (5400, "1h30m"),
        (86400, "24h"),
        (604800, "7d"),
    ],
)
def test_duration_text_reads_back(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text
    assert parse_duration(text) == seconds


def test_kubeconfig_errors_say_what_to_do(tmp_path: Path) -> None:
    from daemon.kube import KubeConfigError, api_client

    with pytest.raises(KubeConfigError, match=r"outside a cluster, pass --kubeconfig FILE"):
        asyncio.run(api_client(None))
    with pytest.raises(KubeConfigError, match=r"pass another with --kubeconfig"):
        asyncio.run(api_client(str(tmp_path / "missing")))


def test_started_at_go_format() -> None:
    assert parse_started_at("2024-05-01T10:00:00.123456789Z") == pytest.approx(1714557600.123456)
    assert parse_started_at("garbage") is None


def test_digest_set_behaves_like_a_set() -> None:
    import random

    from daemon.inventory import DigestSet

    rng = random.Random(4)
    values = [rng.randbytes(32) for _ in range(5000)]
    ours, plain = DigestSet(values[:100]), set(values[:100])
    for value in values[100:4000]:
        ours.add(value)
        plain.add(value)
    ours.update(values[:50])  # duplicates
    for value in values[3990:4010]:
        ours.discard(value)
        plain.discard(value)
    assert len(ours) == len(plain)
    assert all((v in ours) == (v in plain) for v in values)
    assert set(ours) == plain
    for shard in (0, 0x7F, 0xFF):
        assert ours.shard(shard) == {v for v in plain if v[0] == shard}


def _cgroup(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A /proc/self/cgroup and a /sys/fs/cgroup tree with the kernel's file formats."""
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(membership)
    root = tmp_path / "sys-fs-cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return proc, root


@pytest.mark.parametrize(
    ("membership", "files", "quota"),
    [
        # cgroup v2, a pod with limits.cpu: "1" and "2500m", and without a limit
        ("0::/kubepods/pod1/ctr\n", {"kubepods/pod1/ctr/cpu.max": "100000 100000\n"}, 1.0),
        ("0::/kubepods/pod1/ctr\n", {"kubepods/pod1/ctr/cpu.max": "250000 100000\n"}, 2.5),
        ("0::/kubepods/pod1/ctr\n", {"kubepods/pod1/ctr/cpu.max": "max 100000\n"}, None),
        # cgroup v1 (this machine's kind): cpu,cpuacct joined, and the v2 line with no cpu.max
        (
            "4:memory:/k\n3:cpu,cpuacct:/k/ctr\n0::/\n",
            {"cpu/k/ctr/cpu.cfs_quota_us": "50000\n", "cpu/k/ctr/cpu.cfs_period_us": "100000\n"},
            0.5,
        ),
        (
            "3:cpu,cpuacct:/\n0::/\n",
            {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
            None,
        ),
        ("0::/ctr\n", {"ctr/cpu.max": "garbage\n"}, None),
        ("0::/gone\n", {}, None),
    ],
)
def test_cpu_quota_of_the_cgroup(
    tmp_path: Path, membership: str, files: dict[str, str], quota: float | None
) -> None:
    proc, root = _cgroup(tmp_path, membership, files)
    assert cgroup_quota(proc, root) == quota
    cpus = len(os.sched_getaffinity(0))
    expected = cpus if quota is None else min(cpus, math.ceil(quota))
    assert usable_cpus(proc, root) == expected


def test_usable_cpus_of_this_process() -> None:
    # the real /proc and /sys of wherever the suite runs (this machine: v1, no quota)
    quota = cgroup_quota()
    cpus = len(os.sched_getaffinity(0))
    assert usable_cpus() == (cpus if quota is None else max(1, min(cpus, math.ceil(quota))))


@pytest.mark.parametrize(
    "path",
    [
        f"/srv/registry/docker/registry/v2/blobs/sha256/aa/{H1}/data",
        '/srv/a "quoted" \\ back\\slash/\n/tab\t/é/\u2028/\x00/data',
    ],
)
def test_candidate_line_is_json_dumps_of_its_document(path: str) -> None:
    # GET /runs/<id>/candidates serves these lines: written out by hand for speed, they must
    # stay what json.dumps made, byte for byte, whatever the store's root holds
    candidate = Candidate(bytes.fromhex(H2), 12_345_678_901, path)
    assert candidate.line() == json.dumps(candidate.document())
    assert json.loads(candidate.line())["path"] == path
