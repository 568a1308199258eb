"""mode=verify, recover and the listings, on stores the real registry wrote."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

from daemon import manifests
from daemon.config import load_settings
from daemon.findings import Finding
from daemon.progress import Progress
from daemon.prune import DELETE, Engine, RunFailed, RunOptions
from daemon.sources.storage import StorageSource
from daemon.storage import open_storage
from daemon.storage.filesystem import FilesystemStorage
from daemon.verify import VERIFY
from tests.conftest import pruned
from tests.harness.daemon import Daemon
from tests.harness.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    Blob,
    Manifest,
    PushedImage,
    RegistryClient,
    Scenario,
    config_blob,
    oci_manifest,
    random_layer,
    skopeo_pull,
)
from tests.harness.registry import Registry, blobs_on_disk, running_registry

BROKEN = re.compile(r'^Broken image "(sha256:[0-9a-f]{64})": .* \(repository "([^"]+)"\)$')


def _blob_dir(registry: Registry, digest: str, algo: str = "sha256") -> Path:
    hexdigest = digest.partition(":")[2]
    return registry.root / f"docker/registry/v2/blobs/{algo}/{hexdigest[:2]}/{hexdigest}"


def _remove_blob(registry: Registry, digest: str) -> None:
    shutil.rmtree(_blob_dir(registry, digest))


def _image(sc: Scenario, repository: str, tag: str | None, **match: Any) -> PushedImage:
    for image in sc.images:
        same = all(getattr(image.manifest, k) == v for k, v in match.items())
        if image.repository == repository and image.tag == tag and not image.deleted and same:
            return image
    raise AssertionError(f"no image {repository}:{tag}")


def _broken_lines(out: str) -> set[tuple[str, str]]:
    found = set()
    for line in out.splitlines():
        if line.startswith("Broken image"):
            match = BROKEN.match(line)
            assert match, line
            found.add((match.group(2), match.group(1)))
    return found


def test_verify_names_exactly_the_images_whose_blobs_went_missing(
    fresh: tuple[Registry, Scenario], tmp_path: Path
) -> None:
    registry, sc = fresh
    clean = pruned("verify", "--registry-config", registry.config_path)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.splitlines() == ["Checked 13 images: 0 broken"], clean.stdout

    v1 = _image(sc, "app", "v1")
    v2 = _image(sc, "app", "v2")
    team = _image(sc, "team/sub/app", "latest")
    listed = _image(sc, "other", "list")
    artifact = next(i for i in sc.images if b'"subject"' in i.manifest.data)
    child = listed.manifest.children[0]
    own_layer = v2.manifest.layers[-1]  # base1 is shared; this one is v2's own
    _remove_blob(registry, own_layer)  # a layer
    _remove_blob(registry, team.manifest.config)  # a config
    _remove_blob(registry, child)  # a child manifest of a manifest list
    _remove_blob(registry, v1.digest)  # the subject of the artifact (and an image itself)
    expected = {
        ("app", v2.digest),
        ("team/sub/app", team.digest),
        ("other", child),  # its revision is linked: pulled by digest it is gone
        ("other", listed.digest),
        ("app", v1.digest),
        ("app", artifact.digest),
    }

    broken = pruned("verify", "--registry-config", registry.config_path)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert _broken_lines(broken.stdout) == expected, broken.stdout
    assert "Checked 13 images: 6 broken" in broken.stdout
    assert f'image blob "{own_layer}": unknown blob' in broken.stdout
    assert f'child manifest "{child}": unknown blob' in broken.stdout
    assert f'subject "{v1.digest}": unknown blob' in broken.stdout

    # the same through the daemon: the run fails naming them, /broken streams them
    daemon = Daemon(registry.config_path, tmp_path / "state").start()
    try:
        status, doc = daemon.json("POST", "/prune?mode=verify&wait=true")
        assert status == 200, doc
        assert doc["state"] == "failed" and doc["verification"]["broken"] == 6, doc
        assert f"app@{v2.digest}" in doc["error"]
        status, _h, body = daemon.get(f"/runs/{doc['id']}/broken")
        rows = [json.loads(line) for line in body.splitlines()]
        assert {(r["repository"], r["digest"]) for r in rows} == expected
        by_digest = {r["digest"]: r for r in rows}
        assert by_digest[v2.digest]["missing"] == [own_layer]
        assert by_digest[team.digest]["missing"] == [team.manifest.config]
        assert by_digest[v1.digest]["missing"] == [v1.digest]
        assert by_digest[artifact.digest]["missing"] == [v1.digest]
        assert "unknown blob" in by_digest[listed.digest]["reason"]
        _s, _h, text = daemon.get(f"/runs/{doc['id']}", headers={"Accept": "text/plain"})
        assert _broken_lines(text.decode()) == expected
        assert "Checked 13 images: 6 broken" in text.decode()
        _s, _h, metrics = daemon.get("/metrics")
        assert "registry_pruned_broken_images 6.0" in metrics.decode()

        # the listings, straight from the store
        _s, _h, body = daemon.get("/repositories")
        repos = {r["repository"]: r for r in map(json.loads, body.splitlines())}
        assert set(repos) == {"app", "other", "team/sub/app"}
        assert repos["app"]["tags"] == 3
        _s, _h, body = daemon.get("/repositories/team/sub/app/manifests")
        rows = [json.loads(line) for line in body.splitlines()]
        tags = {r["digest"]: r["tags"] for r in rows}
        assert tags[team.digest] == ["latest"]
        assert tags[_image(sc, "team/sub/app", "multi").digest] == ["multi"]
        assert len(rows) == 4  # latest, multi and its two children
        status, _h, body = daemon.get("/repositories/nope/manifests")
        assert status == 404, body
        _s, _h, body = daemon.get("/blobs")
        listed_blobs = {json.loads(line)["digest"] for line in body.splitlines()}
        assert listed_blobs == blobs_on_disk(registry)
    finally:
        daemon.stop()
    cli = pruned("list", "manifests", "app", "--registry-config", registry.config_path)
    assert cli.returncode == 0, cli.stderr
    assert {json.loads(line)["digest"] for line in cli.stdout.splitlines()} >= {
        v2.digest,
        artifact.digest,
    }


# -- the second reading: a blind typed parse ---------------------------------------------------


def blind_parse(data: bytes) -> manifests.References:
    """A typed parse that reads the config and misses everything else (issue 15's bug)."""
    doc = json.loads(data)
    refs = manifests.References("blind")
    config = doc.get("config") if isinstance(doc, dict) else None
    if isinstance(config, dict) and str(config.get("digest", "")).startswith("sha256:"):
        refs.blobs.append(bytes.fromhex(config["digest"][7:]))
    return refs


def _plant_sha512(registry: Registry, repo: str, data: bytes) -> str:
    """A blob uploaded as ``?digest=sha512:...``, laid out as docker-registry 2.8 does it:
    its data under its sha256 path, and ``_layers/sha512/<hex>/link`` naming that sha256."""
    hexdigest = hashlib.sha512(data).hexdigest()
    canonical = "sha256:" + hashlib.sha256(data).hexdigest()
    blob = _blob_dir(registry, canonical, "sha256")
    blob.mkdir(parents=True, exist_ok=True)
    (blob / "data").write_bytes(data)
    link = registry.root / f"docker/registry/v2/repositories/{repo}/_layers/sha512/{hexdigest}"
    link.mkdir(parents=True)
    (link / "link").write_text(canonical)
    return "sha512:" + hexdigest


async def _verify(registry: Registry, typed: Any = None) -> tuple[Any, list[Finding]]:
    settings = load_settings(registry.config_path)
    storage = open_storage(settings.storage, 4)
    found: list[Finding] = []
    engine = Engine(storage, StorageSource(), RunOptions(mode=VERIFY), Progress())
    engine.on_finding = found.append
    if typed is not None:
        engine.typed_parse = typed
    try:
        with contextlib.suppress(RunFailed):  # broken images fail the run: asserted below
            await engine.run()
    finally:
        await storage.close()
    return engine.verification, found


async def test_second_reading_reports_what_a_blind_parse_missed(tmp_path: Path) -> None:
    rng = random.Random(24)
    with running_registry(tmp_path / "registry") as registry:
        client = RegistryClient(registry.url)
        # a schema2 manifest whose layers sit under "Layers": Go's JSON reads it (keys are
        # case-insensitive there), so the registry accepts it and serves its layers
        layer = random_layer(rng, media_type=DOCKER_LAYER)
        cfg = config_blob([layer], media_type=DOCKER_CONFIG)
        doc = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": cfg.with_media_type(DOCKER_CONFIG).descriptor(),
            "Layers": [layer.descriptor()],
        }
        upper = Blob(json.dumps(doc).encode(), DOCKER_MANIFEST)
        client.upload_blob("upper", layer)
        client.upload_blob("upper", cfg)
        client.push_manifest("upper", "v1", _as_manifest(upper))
        # an OCI manifest with a sha512 layer, linked by the registry under _layers/sha512
        data = random_layer(rng).data
        long_digest = _plant_sha512(registry, "long", data)
        cfg2 = config_blob([], label="sha512")
        client.upload_blob("long", cfg2)
        doc2 = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": cfg2.descriptor(),
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": long_digest,
                    "size": len(data),
                }
            ],
        }
        long = Blob(json.dumps(doc2).encode(), OCI_MANIFEST)
        client.push_manifest("long", "v1", _as_manifest(long))
        # annotations naming a manifest of this store and a digest held elsewhere: counted
        # apart, not errors (a base image's digest)
        base_layer = random_layer(rng)
        base_cfg = config_blob([base_layer], label="annotated")
        elsewhere = "sha256:" + hashlib.sha256(b"a base image held elsewhere").hexdigest()
        annotated = oci_manifest(
            base_cfg,
            [base_layer],
            annotations={"org.opencontainers.image.base.digest": upper.digest},
        )
        annotated_doc = json.loads(annotated.data)
        annotated_doc["x-origin"] = {"source": f"quay.io/x/y@{elsewhere}"}
        annotated_blob = Blob(json.dumps(annotated_doc).encode(), OCI_MANIFEST)
        client.push_image("annotated", "v1", _as_manifest(annotated_blob), [base_layer, base_cfg])
        assert (registry.root / "docker/registry/v2/repositories/long/_layers/sha512").is_dir()

        result, found = await _verify(registry, blind_parse)
        assert result is not None
        reasons = {f.digest: f.reason for f in found}
        assert set(reasons) == {upper.digest, long.digest, annotated_blob.digest}, reasons
        assert f'unparsed reference "{layer.digest}"' in reasons[upper.digest]
        assert f'unparsed reference "{long_digest}"' in reasons[long.digest]
        # the blind parse misses this one's layer too; its annotation and the digest held
        # elsewhere are no findings: counted apart
        assert reasons[annotated_blob.digest].count("unparsed reference") == 1
        assert f'unparsed reference "{base_layer.digest}"' in reasons[annotated_blob.digest]
        assert result.unparsed == 3 and result.broken == 3
        assert result.annotations == 1 and result.foreign == 1
        assert result.images == 3

        # the real parse reads the sha512 layer and the annotated image whole
        _result, found = await _verify(registry)
        assert annotated_blob.digest not in {f.digest for f in found}
        assert long.digest not in {f.digest for f in found}
        # a layer whose data is not the size its descriptor gives: broken, naming both sizes
        layer_file = _blob_dir(registry, base_layer.digest) / "data"
        layer_file.write_bytes(base_layer.data + b"!")
        _result, found = await _verify(registry)
        by_digest = {f.digest: f for f in found}
        assert set(by_digest) == {annotated_blob.digest}, by_digest
        assert by_digest[annotated_blob.digest].reason == (
            f'image blob "{base_layer.digest}": {len(base_layer.data) + 1} bytes where the '
            f"manifest says {len(base_layer.data)}"
        )
        assert by_digest[annotated_blob.digest].missing == []
        layer_file.write_bytes(base_layer.data)
        # and a sha512 layer gone is a missing blob like any other
        layer_data = registry.root / (
            f"docker/registry/v2/repositories/long/_layers/sha512/{long_digest[7:]}/link"
        )
        shutil.rmtree(_blob_dir(registry, layer_data.read_text(), "sha256"))
        _result, found = await _verify(registry)
        assert {f.digest: f.missing for f in found}[long.digest] == [long_digest]


def _as_manifest(blob: Blob) -> Manifest:
    return Manifest(blob.data, blob.media_type)


# -- after a delete ---------------------------------------------------------------------------


class _Counting(FilesystemStorage):
    """The real filesystem driver, counting the walks a run makes."""

    walks = 0
    shard_listings = 0

    async def scan_repositories(self, layers: bool = True) -> Any:
        type(self).walks += 1
        async for batch in super().scan_repositories(layers):
            yield batch

    async def blobs_outside(self, shard: str, members: Any) -> Any:
        type(self).shard_listings += 1
        return await super().blobs_outside(shard, members)


async def test_every_delete_verifies_what_it_kept(
    fresh: tuple[Registry, Scenario], tmp_path: Path
) -> None:
    registry, sc = fresh
    registry.restart(read_only=True)
    out = pruned("delete", "--registry-config", registry.config_path, "--grace", "0")
    assert out.returncode == 0, out.stderr
    assert "Verification passed: checked 13 kept images: 0 broken" in out.stdout, out.stdout
    for repo, ref in sc.kept[:2]:
        skopeo_pull(registry.url, repo, ref, tmp_path / ref.replace(":", "_"))

    # a kept image loses a layer (a disk fault, a pruner bug): the next delete fails, naming it
    v2 = _image(sc, "app", "v2")
    _remove_blob(registry, v2.manifest.layers[-1])
    settings = load_settings(registry.config_path)
    storage = _Counting(settings.storage.rootdirectory, 4)
    found: list[Finding] = []
    engine = Engine(
        storage,
        StorageSource(),
        RunOptions(mode=DELETE, grace=0, registry_read_only=True),
        Progress(),
    )
    engine.on_finding = found.append
    try:
        try:
            await engine.run()
            raise AssertionError("the delete should have failed its verification")
        except RunFailed as exc:
            assert f"app@{v2.digest}" in str(exc)
            assert "verification after the delete found 1 broken images" in str(exc)
    finally:
        await storage.close()
    assert {(f.repository, f.digest) for f in found} == {("app", v2.digest)}
    assert engine.verification is not None and engine.verification.after_delete
    # what the delete had listed served its verification: one walk, one pass over the shards
    assert _Counting.walks == 1 and _Counting.shard_listings == 256


def test_second_reading_finds_digests_in_any_key_case_and_nesting() -> None:
    from daemon.verifying import read_facts

    a, b, c, d = (hashlib.sha256(bytes([i])).hexdigest() for i in range(4))
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "x", "digest": f"sha256:{a}", "size": 2},
        "layers": [],
        "deep": [{"x": {"y": [f"SHA256:{b.upper()}"]}}],  # any case, any nesting
        f"sha256:{c}": "a key",  # a key is a string too
        "annotations": {"base": f"sha256:{d}"},  # noted, not checked
        "long": f"sha256:{a}{a}",  # a longer hex run is no sha256 digest
    }
    facts = read_facts(manifests.parse, json.dumps(doc).encode())
    assert facts.blobs == bytes.fromhex(a) and not facts.error
    assert facts.loose == tuple(sorted((f"sha256:{b}", f"sha256:{c}")))
    assert facts.noted == 1
    assert facts.size_of(bytes.fromhex(a)) == 2
    # an unparsable manifest is a finding, and still read the second way
    broken = read_facts(manifests.parse, b'{"schemaVersion": 7, "x": "sha256:' + b.encode() + b'"}')
    assert broken.error and broken.loose == (f"sha256:{b}",)


def test_blob_check_asks_each_blob_once_and_names_only_the_exceptions() -> None:
    from daemon.packed import NO_SIZE
    from daemon.verifying import SIZE_WANT, size_mismatches

    whole, short, gone, unsized = (hashlib.sha256(bytes([i])).digest() for i in range(4))
    sizes = {whole: 10, short: 5, unsized: 7}
    asked: list[bytes] = []

    def size_of(raw: bytes) -> int | None:
        asked.append(raw)
        return sizes.get(raw)

    records = b"".join(
        SIZE_WANT.pack(raw, want)
        for raw, want in [
            (whole, 10),
            (short, 5),  # one image gives the right size, another a wrong one
            (short, 6),
            (whole, 10),  # shared: asked once
            (gone, NO_SIZE),
            (unsized, NO_SIZE),  # no descriptor size: only its data must be there
            (unsized, -1),  # a size the judging compares itself: always told
        ]
    )
    found = size_mismatches(records, size_of)
    assert sorted(found) == sorted([(short, 5), (gone, None), (unsized, 7)])
    assert sorted(asked) == sorted([whole, short, gone, unsized])


def test_a_chunk_folds_each_blob_reference_into_its_shard_records() -> None:
    """The reader's fold: plain images come back as their length, others as their facts;
    every blob reference as one (digest, wanted size) record in its blob shard's bytes,
    sorted, each once; a size no int64 holds (or below 0) is wanted as -1."""
    from daemon.packed import NO_SIZE
    from daemon.verifying import SIZE_WANT, Facts, fold_facts

    first, last = b"\x00" * 32, b"\xff" * 32
    mid = hashlib.sha256(b"mid").digest()
    plain = Facts(length=100, blobs=last + mid + first, sizes=(1, None, 3))
    shared = Facts(length=50, blobs=mid + first, sizes=(2**63, 3))  # past int64; a repeat
    child = hashlib.sha256(b"child").digest()
    listing = Facts(length=70, children=child, sizes=(70,))  # a list: its children are no blob
    negative = Facts(length=20, blobs=mid, sizes=(-5,))
    chunk = fold_facts([plain, None, ValueError("driver"), shared, listing, negative])
    assert chunk.facts == [100, None, None, 50, listing, 20]
    got = {shard: SIZE_WANT.iter_unpack(data) for shard, data in chunk.wants}
    assert [shard for shard, _d in chunk.wants] == sorted({0x00, 0xFF, mid[0]})
    assert list(got[0x00]) == [(first, 3)]  # twice wanted at 3: once
    assert list(got[0xFF]) == [(last, 1)]
    assert sorted(got[mid[0]]) == sorted([(mid, NO_SIZE), (mid, -1)])
    assert fold_facts([]).wants == []


def test_records_a_listed_shard_vouches_for_are_not_asked_again() -> None:
    """After a delete whose listing proved data (object stores): of a shard's records, only
    those whose digest the in-use set lacks are asked; none when it holds them all."""
    from daemon.verify import _outside
    from daemon.verifying import SIZE_WANT

    inside = sorted(bytes([0x33]) + hashlib.sha256(bytes([i])).digest()[1:] for i in range(50))
    stranger = bytes([0x33]) + b"\xff" * 31  # sorts last in the shard
    first = bytes([0x33]) + b"\x00" * 31  # sorts first
    base = b"".join(inside)
    records = [SIZE_WANT.pack(raw, 7) for raw in [inside[0], stranger, inside[49], first]]
    records.append(SIZE_WANT.pack(stranger, 9))  # one digest wanted at two sizes: both asked
    assert _outside(b"".join(records), base) == records[1] + records[3] + records[4]
    assert _outside(records[0] + records[2], base) == b""
    assert _outside(b"".join(records), b"") == b"".join(records)
