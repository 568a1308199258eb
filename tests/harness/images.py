"""Build real image content and push it through the registry's HTTP API."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import io
import json
import random
import secrets
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

ALL_MANIFEST_TYPES = (
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST,
    DOCKER_SCHEMA1_SIGNED,
)
AMD64 = {"architecture": "amd64", "os": "linux"}
ARM64 = {"architecture": "arm64", "os": "linux", "variant": "v8"}


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """Content addressed by its sha256 digest: a layer, a config or a manifest."""

    data: bytes
    media_type: str
    diff_id: str = ""  # layers: digest of the uncompressed tar (config rootfs.diff_ids)

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        """An OCI/Docker descriptor for this blob, with optional extra fields."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}

    def with_media_type(self, media_type: str) -> Blob:
        return Blob(self.data, media_type, self.diff_id)


@dataclass(frozen=True)
class Manifest(Blob):
    """A manifest: its exact bytes (what the digest covers) plus what it references."""

    config: str = ""  # image manifests: the config blob's digest
    layers: tuple[str, ...] = ()  # image manifests: layer digests, base first
    children: tuple[str, ...] = ()  # manifest lists and indexes: child manifest digests

    @property
    def references(self) -> tuple[str, ...]:
        """Every digest this manifest points at directly."""
        return ((self.config,) if self.config else ()) + self.layers + self.children


def random_layer(rng: random.Random, size: int | None = None, media_type: str = OCI_LAYER) -> Blob:
    """A valid gzip tarball holding one file of random bytes (1-64 KiB by default)."""
    if size is None:
        size = rng.randint(1024, 64 * 1024)
    payload = rng.randbytes(size)
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"data/{rng.getrandbits(64):016x}.bin")
        info.size = size
        info.mtime = 0
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(payload))
    tar_bytes = tar_buf.getvalue()
    # mtime=0 keeps the gzip bytes a pure function of the tar (stable digests per seed).
    compressed = gzip.compress(tar_bytes, mtime=0)
    return Blob(compressed, media_type, diff_id=sha256_digest(tar_bytes))


def config_blob(
    layers: Sequence[Blob],
    *,
    platform: Mapping[str, str] = AMD64,
    media_type: str = OCI_CONFIG,
    label: str = "",
) -> Blob:
    """A valid image config whose ``rootfs.diff_ids`` match ``layers``."""
    doc: dict[str, Any] = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": platform["architecture"],
        "os": platform["os"],
        "config": {"Cmd": ["/bin/true"], "Labels": {"test.label": label} if label else {}},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "harness"} for _ in layers],
    }
    if "variant" in platform:
        doc["variant"] = platform["variant"]
    return Blob(_json_bytes(doc), media_type)


def _json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, indent=3).encode()


def docker_manifest(config: Blob, layers: Sequence[Blob]) -> Manifest:
    """A Docker schema2 image manifest."""
    doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": config.with_media_type(DOCKER_CONFIG).descriptor(),
        "layers": [layer.with_media_type(DOCKER_LAYER).descriptor() for layer in layers],
    }
    layer_digests = tuple(layer.digest for layer in layers)
    return Manifest(_json_bytes(doc), DOCKER_MANIFEST, config=config.digest, layers=layer_digests)


def oci_manifest(
    config: Blob,
    layers: Sequence[Blob],
    *,
    artifact_type: str | None = None,
    subject: Manifest | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Manifest:
    """An OCI image manifest; with ``artifact_type``/``subject`` an OCI 1.1 artifact."""
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST}
    if artifact_type:
        doc["artifactType"] = artifact_type
    doc["config"] = config.descriptor()
    doc["layers"] = [layer.descriptor() for layer in layers]
    if subject is not None:
        doc["subject"] = subject.descriptor()
    if annotations:
        doc["annotations"] = dict(annotations)
    layer_digests = tuple(layer.digest for layer in layers)
    return Manifest(_json_bytes(doc), OCI_MANIFEST, config=config.digest, layers=layer_digests)


def _index(media_type: str, children: Sequence[tuple[Manifest, Mapping[str, str]]]) -> Manifest:
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [child.descriptor(platform=dict(plat)) for child, plat in children],
    }
    child_digests = tuple(child.digest for child, _ in children)
    return Manifest(_json_bytes(doc), media_type, children=child_digests)


def docker_manifest_list(children: Sequence[tuple[Manifest, Mapping[str, str]]]) -> Manifest:
    """A Docker manifest list over (child manifest, platform) pairs."""
    return _index(DOCKER_MANIFEST_LIST, children)


def oci_index(children: Sequence[tuple[Manifest, Mapping[str, str]]]) -> Manifest:
    """An OCI image index over (child manifest, platform) pairs."""
    return _index(OCI_INDEX, children)


# --- Docker schema1 (libtrust JWS, ES256 over P-256, in pure Python) -------------------------

_P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
_A = _P - 3
_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_G = (
    0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
    0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5,
)
# DER SubjectPublicKeyInfo prefix of an uncompressed P-256 point (what libtrust hashes for kid).
_P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")

_Point = tuple[int, int] | None


def _ec_add(p1: _Point, p2: _Point) -> _Point:
    if p1 is None:
        return p2
    if p2 is None:
        return p1
    (x1, y1), (x2, y2) = p1, p2
    if x1 == x2 and (y1 + y2) % _P == 0:
        return None
    if p1 == p2:
        lam = (3 * x1 * x1 + _A) * pow(2 * y1, -1, _P) % _P
    else:
        lam = (y2 - y1) * pow(x2 - x1, -1, _P) % _P
    x3 = (lam * lam - x1 - x2) % _P
    return x3, (lam * (x1 - x3) - y1) % _P


def _ec_mul(k: int, point: _Point) -> _Point:
    result: _Point = None
    while k:
        if k & 1:
            result = _ec_add(result, point)
        point = _ec_add(point, point)
        k >>= 1
    return result


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _SigningKey:
    """A throwaway P-256 key that signs like libtrust's ecPrivateKey (ES256, raw r||s)."""

    def __init__(self) -> None:
        self.d = secrets.randbelow(_N - 1) + 1
        point = _ec_mul(self.d, _G)
        assert point is not None
        self.x, self.y = point

    def jwk(self) -> dict[str, str]:
        x, y = self.x.to_bytes(32, "big"), self.y.to_bytes(32, "big")
        spki = _P256_SPKI_PREFIX + b"\x04" + x + y
        kid_b32 = base64.b32encode(hashlib.sha256(spki).digest()[:30]).decode().rstrip("=")
        kid = ":".join(kid_b32[i : i + 4] for i in range(0, len(kid_b32), 4))
        return {"crv": "P-256", "kid": kid, "kty": "EC", "x": _b64url(x), "y": _b64url(y)}

    def sign(self, message: bytes) -> bytes:
        z = int.from_bytes(hashlib.sha256(message).digest(), "big")
        while True:
            k = secrets.randbelow(_N - 1) + 1
            point = _ec_mul(k, _G)
            assert point is not None
            r = point[0] % _N
            s = pow(k, -1, _N) * (z + r * self.d) % _N
            if r and s:
                return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@dataclass(frozen=True)
class _Schema1(Manifest):
    """A schema1 manifest: ``data`` is the canonical payload, ``signed`` what is pushed."""

    signed: bytes = b""


def schema1_manifest(
    name: str, tag: str, layers: Sequence[Blob], *, architecture: str = "amd64"
) -> Manifest:
    """A libtrust-signed Docker schema1 manifest (``layers`` base first).

    Its digest covers the unsigned payload, which is what distribution stores."""
    ids = [
        hashlib.sha256(f"{name}:{tag}:{i}:{layer.digest}".encode()).hexdigest()
        for i, layer in enumerate(layers)
    ]
    history = []
    for i in range(len(layers)):
        v1: dict[str, Any] = {"id": ids[i], "created": "2024-01-01T00:00:00Z"}
        if i:
            v1["parent"] = ids[i - 1]
        v1["container_config"] = {"Cmd": [f"/bin/sh -c #(nop) layer {i}"]}
        if i == len(layers) - 1:
            v1.update(architecture=architecture, os="linux", config={"Cmd": ["/bin/true"]})
        history.append({"v1Compatibility": json.dumps(v1, separators=(",", ":"))})
    doc = {
        "schemaVersion": 1,
        "name": name,
        "tag": tag,
        "architecture": architecture,
        "fsLayers": [{"blobSum": layer.digest} for layer in reversed(layers)],
        "history": list(reversed(history)),
    }
    payload = _json_bytes(doc)
    # libtrust: the signature covers payload[:formatLength] + formatTail, and the signed
    # form inserts ',"signatures": [...]' between the two.
    close = payload.rstrip().rfind(b"}")
    format_length = len(payload[:close].rstrip())
    format_tail = payload[format_length:]
    protected = _b64url(
        json.dumps(
            {
                "formatLength": format_length,
                "formatTail": _b64url(format_tail),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            separators=(",", ":"),
        ).encode()
    )
    key = _SigningKey()
    signature = key.sign(f"{protected}.{_b64url(payload)}".encode())
    signatures = [
        {
            "header": {"jwk": key.jwk(), "alg": "ES256"},
            "signature": _b64url(signature),
            "protected": protected,
        }
    ]
    sig_json = json.dumps(signatures, indent=3).replace("\n", "\n   ")
    signed = payload[:format_length] + b',\n   "signatures": ' + sig_json.encode() + format_tail
    layer_digests = tuple(layer.digest for layer in layers)
    # The registry stores (and digests) the unsigned payload; we push the signed form.
    return _Schema1(payload, DOCKER_SCHEMA1_SIGNED, layers=layer_digests, signed=signed)


def plant_schema1(root: str | Path, repo: str, tag: str, layers: Sequence[Blob]) -> Manifest:
    """Write a schema1 image straight into a filesystem store, as distribution lays it out."""
    manifest = schema1_manifest(repo, tag, layers)
    v2 = Path(root) / "docker/registry/v2"
    repo_dir = v2 / "repositories" / repo

    def write_blob(data: bytes) -> str:
        digest = sha256_digest(data)
        path = v2 / "blobs/sha256" / digest[7:9] / digest[7:] / "data"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return digest

    def write_link(path: Path, digest: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "link").write_text(digest)

    for layer in layers:
        write_link(repo_dir / "_layers/sha256" / write_blob(layer.data)[7:], layer.digest)
    digest = write_blob(manifest.data)
    hexd = digest[7:]
    write_link(repo_dir / "_manifests/revisions/sha256" / hexd, digest)
    write_link(repo_dir / "_manifests/tags" / tag / "current", digest)
    write_link(repo_dir / "_manifests/tags" / tag / "index/sha256" / hexd, digest)
    return manifest


# --- HTTP client ------------------------------------------------------------------------------


class RegistryHTTPError(RuntimeError):
    """A registry API call answered with an unexpected status."""

    def __init__(self, method: str, url: str, status: int, body: bytes) -> None:
        super().__init__(f"{method} {url} -> {status}: {body[:2000].decode(errors='replace')}")
        self.status = status
        self.body = body


@dataclass
class Response:
    """Status, headers and body of one API call."""

    status: int
    headers: Message  # case-insensitive: Go canonicalizes names (Docker-Upload-Uuid)
    body: bytes


class RegistryClient:
    """A synchronous client for the distribution v2 push API (urllib, no auth)."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        expect: Sequence[int] = (200,),
    ) -> Response:
        """One API call; raises RegistryHTTPError unless the status is in ``expect``."""
        url = urllib.parse.urljoin(self.base_url + "/", path_or_url)
        req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                result = Response(resp.status, resp.headers, resp.read())
        except urllib.error.HTTPError as exc:
            result = Response(exc.code, exc.headers, exc.read())
        if result.status not in expect:
            raise RegistryHTTPError(method, url, result.status, result.body)
        return result

    def _start(self, name: str) -> tuple[str, str]:
        resp = self.request("POST", f"/v2/{name}/blobs/uploads/", data=b"", expect=(202,))
        return resp.headers["Location"], resp.headers.get("Docker-Upload-UUID", "")

    @staticmethod
    def _with_digest(location: str, digest: str) -> str:
        sep = "&" if "?" in location else "?"
        return f"{location}{sep}digest={urllib.parse.quote(digest)}"

    def blob_exists(self, name: str, digest: str) -> bool:
        resp = self.request("HEAD", f"/v2/{name}/blobs/{digest}", expect=(200, 404))
        return resp.status == 200

    def upload_blob(self, name: str, blob: Blob | bytes, *, chunk_size: int = 0) -> str:
        """Upload monolithically (POST + PUT with body) or in PATCH chunks; returns the digest."""
        data = blob.data if isinstance(blob, Blob) else blob
        digest = sha256_digest(data)
        location, _ = self._start(name)
        if chunk_size > 0:
            for offset in range(0, len(data), chunk_size):
                chunk = data[offset : offset + chunk_size]
                resp = self.request(
                    "PATCH",
                    location,
                    data=chunk,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                    },
                    expect=(202,),
                )
                location = resp.headers["Location"]
            body = b""
        else:
            body = data
        resp = self.request(
            "PUT",
            self._with_digest(location, digest),
            data=body,
            headers={"Content-Type": "application/octet-stream"},
            expect=(201,),
        )
        if resp.headers.get("Docker-Content-Digest", digest) != digest:
            raise AssertionError(f"registry stored {resp.headers['Docker-Content-Digest']}")
        return digest

    def mount_blob(self, name: str, digest: str, source: str) -> bool:
        """Cross-repository mount; True when mounted (201), False when it fell back (202)."""
        query = urllib.parse.urlencode({"mount": digest, "from": source})
        resp = self.request(
            "POST", f"/v2/{name}/blobs/uploads/?{query}", data=b"", expect=(201, 202)
        )
        if resp.status == 202:
            # The registry opened a plain upload instead; cancel it so nothing is left behind.
            self.request("DELETE", resp.headers["Location"], expect=(204, 404))
        return resp.status == 201

    def start_upload(self, name: str, data: bytes = b"partial upload that never finishes") -> str:
        """Leave an upload half done (POST + one PATCH, no PUT); returns its UUID."""
        location, uuid = self._start(name)
        self.request(
            "PATCH",
            location,
            data=data,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"0-{len(data) - 1}",
            },
            expect=(202,),
        )
        return uuid

    def upload_orphan_blobs(self, name: str, n: int, rng: random.Random | None = None) -> list[str]:
        """Upload ``n`` layer blobs that no manifest will ever reference."""
        rng = rng or random.Random()
        return [self.upload_blob(name, random_layer(rng)) for _ in range(n)]

    def push_manifest(self, name: str, ref: str, manifest: Manifest) -> str:
        """PUT a manifest by tag or digest with its media type; returns the stored digest."""
        body = manifest.signed if isinstance(manifest, _Schema1) else manifest.data
        resp = self.request(
            "PUT",
            f"/v2/{name}/manifests/{ref}",
            data=body,
            headers={"Content-Type": manifest.media_type},
            expect=(201,),
        )
        digest = resp.headers.get("Docker-Content-Digest", "")
        if digest != manifest.digest:
            raise AssertionError(f"pushed {manifest.digest}, registry says {digest!r}")
        return digest

    def get_manifest(self, name: str, ref: str) -> Response:
        """GET a manifest accepting every type this harness pushes."""
        return self.request(
            "GET", f"/v2/{name}/manifests/{ref}", headers={"Accept": ", ".join(ALL_MANIFEST_TYPES)}
        )

    def delete_manifest(self, name: str, digest: str) -> None:
        """DELETE a manifest by digest (removes its revision link and tags pointing at it)."""
        self.request("DELETE", f"/v2/{name}/manifests/{digest}", expect=(202,))

    def tags(self, name: str) -> list[str]:
        resp = self.request("GET", f"/v2/{name}/tags/list", expect=(200, 404))
        if resp.status == 404:
            return []
        return json.loads(resp.body).get("tags") or []

    def catalog(self) -> list[str]:
        return json.loads(self.request("GET", "/v2/_catalog?n=1000").body)["repositories"]

    def push_image(
        self,
        name: str,
        ref: str | None,
        manifest: Manifest,
        blobs: Sequence[Blob],
        *,
        chunk_size: int = 0,
    ) -> str:
        """Upload the blobs that are missing, then the manifest (by tag, or by digest)."""
        for blob in blobs:
            if not self.blob_exists(name, blob.digest):
                self.upload_blob(name, blob, chunk_size=chunk_size)
        return self.push_manifest(name, ref or manifest.digest, manifest)


def skopeo_pull(registry_url: str, name: str, ref: str, dest_dir: str | Path) -> None:
    """``skopeo copy --all`` a tag or digest into a ``dir:`` layout; raises with stderr."""
    host = urllib.parse.urlsplit(registry_url).netloc or registry_url
    sep = "@" if ref.startswith("sha256:") else ":"
    cmd = [
        "skopeo",
        "copy",
        "--all",
        "--src-tls-verify=false",
        f"docker://{host}/{name}{sep}{ref}",
        f"dir:{dest_dir}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")


def pull_kept(registry_url: str, kept: Iterable[tuple[str, str]], where: Path) -> None:
    """Every kept (repository, reference) pulls whole with ``skopeo copy --all``."""
    for i, (repo, ref) in enumerate(kept):
        skopeo_pull(registry_url, repo, ref, where / f"pull{i}")


# --- the standard scenario --------------------------------------------------------------------


@dataclass(frozen=True)
class PushedImage:
    """One manifest the scenario pushed: where, under which tag, and whether it was deleted."""

    repository: str
    tag: str | None  # the tag naming it now; None when pushed by digest or its tag moved
    manifest: Manifest
    deleted: bool = False

    @property
    def digest(self) -> str:
        return self.manifest.digest


@dataclass
class Scenario:
    """What build_scenario pushed, and what garbage-collect should (not) find eligible."""

    registry_url: str
    kept: list[tuple[str, str]] = field(default_factory=list)  # (repo, tag or digest) to pull
    expected_orphans: set[str] = field(default_factory=set)  # garbage-collect --dry-run's answer
    # What --delete-untagged finds eligible on top of expected_orphans (see build_scenario).
    untagged_eligible: set[str] = field(default_factory=set)
    pushed: set[str] = field(default_factory=set)  # every blob and manifest digest pushed
    repositories: list[str] = field(default_factory=list)
    images: list[PushedImage] = field(default_factory=list)
    orphan_uploads: list[tuple[str, str]] = field(default_factory=list)  # (repo, digest)
    uploads: list[tuple[str, str]] = field(default_factory=list)  # (repo, uuid) half-done
    schema1: bool = False

    @property
    def in_use(self) -> set[str]:
        """Digests that must survive any prune."""
        return self.pushed - self.expected_orphans

    @property
    def deleted_manifests(self) -> list[tuple[str, str]]:
        """(repo, digest) of manifests deleted through the API."""
        return [(i.repository, i.digest) for i in self.images if i.deleted]

    @property
    def untagged(self) -> list[tuple[str, str]]:
        """(repo, digest) of live manifests that no tag names."""
        return [(i.repository, i.digest) for i in self.images if i.tag is None and not i.deleted]


def build_scenario(registry: Any, *, seed: int = 1, schema1: bool | None = None) -> Scenario:
    """Fill ``registry`` (anything with ``url``) with the standard store the tests use.

    The same seed gives the same digests (schema1 signatures aside, which are not stored).
    """
    rng = random.Random(seed)
    client = RegistryClient(registry.url)
    with_schema1 = bool(getattr(registry, "schema1", False)) if schema1 is None else schema1
    sc = Scenario(registry_url=registry.url, schema1=with_schema1)
    sc.repositories = ["app", "team/sub/app", "other"]

    def push(
        name: str,
        tag: str | None,
        manifest: Manifest,
        blobs: Sequence[Blob],
        chunk_size: int = 0,
    ) -> PushedImage:
        client.push_image(name, tag, manifest, blobs, chunk_size=chunk_size)
        sc.pushed.update(blob.digest for blob in blobs)
        sc.pushed.add(manifest.digest)
        image = PushedImage(name, tag, manifest)
        sc.images.append(image)
        return image

    def retag(image: PushedImage, **changes: Any) -> None:
        sc.images[sc.images.index(image)] = dataclasses.replace(image, **changes)

    # Base layers shared by every repository.
    base1, base2 = random_layer(rng), random_layer(rng)

    # app: Docker schema2 (v1), OCI (v2), a moved tag, an OCI 1.1 artifact about app:v1.
    app1 = random_layer(rng)
    cfg = config_blob([base1, base2, app1], label="app:v1")
    app_v1 = push(
        "app", "v1", docker_manifest(cfg, [base1, base2, app1]), [base1, base2, app1, cfg]
    )
    sc.kept.append(("app", "v1"))

    app2 = random_layer(rng)
    cfg = config_blob([base1, app2], label="app:v2")
    push("app", "v2", oci_manifest(cfg, [base1, app2]), [base1, app2, cfg])
    sc.kept.append(("app", "v2"))

    # Re-pushing a tag leaves the old manifest as an untagged revision, which distribution
    # keeps (in use) unless garbage-collect runs with --delete-untagged.
    old_layer = random_layer(rng)
    old_cfg = config_blob([base1, old_layer], label="app:latest old")
    old = push(
        "app", "latest", oci_manifest(old_cfg, [base1, old_layer]), [base1, old_layer, old_cfg]
    )
    new_layer = random_layer(rng)
    cfg = config_blob([base1, new_layer], label="app:latest")
    push("app", "latest", oci_manifest(cfg, [base1, new_layer]), [base1, new_layer, cfg])
    retag(old, tag=None)
    sc.kept += [("app", "latest"), ("app", old.digest)]
    sc.untagged_eligible |= {old.digest, old_cfg.digest, old_layer.digest}

    # The artifact follows OCI 1.1: empty config, its own payload type, subject = app:v1,
    # pushed by digest (untagged, as referrers are).
    empty = Blob(b"{}", OCI_EMPTY)
    sbom_type = "application/vnd.example.sbom.v1+json"
    sbom = Blob(_json_bytes({"sbom": "harness", "n": rng.getrandbits(32)}), sbom_type)
    artifact = oci_manifest(
        empty,
        [sbom],
        artifact_type=sbom_type,
        subject=app_v1.manifest,
        annotations={"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    )
    push("app", None, artifact, [empty, sbom])
    sc.kept.append(("app", artifact.digest))
    sc.untagged_eligible |= {artifact.digest, empty.digest, sbom.digest}

    # team/sub/app: an OCI image uploaded in PATCH chunks, and a multi-arch OCI index.
    t1 = random_layer(rng, 48 * 1024)
    cfg = config_blob([base1, base2, t1], label="team latest")
    push(
        "team/sub/app",
        "latest",
        oci_manifest(cfg, [base1, base2, t1]),
        [base1, base2, t1, cfg],
        chunk_size=16 * 1024,
    )
    sc.kept.append(("team/sub/app", "latest"))

    # Index children are pushed by digest, hence untagged. distribution 2.8's
    # --delete-untagged removes their revisions and their config/layers, but still marks the
    # child manifests themselves through the index (its known multi-arch bug).
    children = []
    for plat in (AMD64, ARM64):
        own = random_layer(rng)
        layers = [base1, own] if plat is AMD64 else [own]
        cfg = config_blob(layers, platform=plat, label=f"multi {plat['architecture']}")
        children.append(
            (push("team/sub/app", None, oci_manifest(cfg, layers), [*layers, cfg]), plat)
        )
        sc.untagged_eligible |= {own.digest, cfg.digest}
    push("team/sub/app", "multi", oci_index([(c.manifest, p) for c, p in children]), [])
    sc.kept.append(("team/sub/app", "multi"))

    # other: a Docker manifest list, a schema1 image, then the orphans. base2 arrives by a
    # cross-repository mount, as docker push does it: a link, no new blob.
    if not client.mount_blob("other", base2.digest, "app"):
        raise AssertionError("cross-repository mount of base2 was refused")
    children = []
    for plat in (AMD64, ARM64):
        own = random_layer(rng)
        cfg = config_blob([base2, own], platform=plat, media_type=DOCKER_CONFIG)
        child = docker_manifest(cfg, [base2, own])
        children.append((push("other", None, child, [base2, own, cfg]), plat))
        sc.untagged_eligible |= {own.digest, cfg.digest}
    push("other", "list", docker_manifest_list([(c.manifest, p) for c, p in children]), [])
    sc.kept.append(("other", "list"))

    if with_schema1:
        s1_layers = [base1, random_layer(rng, media_type=DOCKER_LAYER)]
        push("other", "schema1", schema1_manifest("other", "schema1", s1_layers), s1_layers)
        sc.kept.append(("other", "schema1"))

    # Orphans, the seed's ways. (1) An image deleted through the API: its manifest, config
    # and own layers lose every reference; base2 stays in use through the kept images.
    doomed_layers = [base2, random_layer(rng), random_layer(rng)]
    cfg = config_blob(doomed_layers, label="doomed")
    doomed = push("other", "doomed", docker_manifest(cfg, doomed_layers), [*doomed_layers, cfg])
    client.delete_manifest("other", doomed.digest)
    retag(doomed, tag=None, deleted=True)
    sc.expected_orphans |= {doomed.digest, cfg.digest, *(b.digest for b in doomed_layers[1:])}

    # (2) A push that failed, or was refused by quota, after its blobs went up.
    for name, n in (("other", 3), ("team/sub/app", 1)):
        for digest in client.upload_orphan_blobs(name, n, rng):
            sc.orphan_uploads.append((name, digest))
            sc.pushed.add(digest)
            sc.expected_orphans.add(digest)

    # (3) An upload left half done: under _uploads/, not a blob, so never a blob candidate.
    sc.uploads.append(("team/sub/app", client.start_upload("team/sub/app")))
    return sc


def api_pull(client: RegistryClient, name: str, ref: str) -> int:
    """Fetch a manifest and, recursively, everything it names, through the registry's API by
    the digests it names (sha256, sha384, sha512), each checked against its content; how many
    objects. For what skopeo 1.9 cannot copy: blobs and children named by sha384/sha512."""
    accept = {"Accept": ", ".join(ALL_MANIFEST_TYPES)}
    resp = client.request("GET", f"/v2/{name}/manifests/{ref}", headers=accept)
    if ":" in ref:
        _verify(ref, resp.body)
    doc = json.loads(resp.body)
    fetched = 1
    for child in doc.get("manifests") or ():
        fetched += api_pull(client, name, child["digest"])
    named = [doc["config"]] if "config" in doc else []
    named += list(doc.get("layers") or ()) + list(doc.get("blobs") or ())
    for descriptor in named:
        digest = descriptor["digest"]
        _verify(digest, client.request("GET", f"/v2/{name}/blobs/{digest}").body)
        fetched += 1
    return fetched


def _verify(digest: str, data: bytes) -> None:
    algo, _, hexpart = digest.partition(":")
    if hashlib.new(algo, data).hexdigest() != hexpart:
        raise AssertionError(f"the registry served other content for {digest}")
