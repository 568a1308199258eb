"""Parse every manifest media type a registry stores -> the digests it references.

Mirrors distribution 2.8's manifest store: schemaVersion picks the family, then the
mediaType field (or, when absent, the shape) picks the parser; unknown kinds are errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from daemon.layout import InvalidDigest, parse_digest

DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_ARTIFACT = "application/vnd.oci.artifact.manifest.v1+json"
IMAGE_MANIFESTS = (DOCKER_V2, OCI_MANIFEST)
LISTS = (DOCKER_LIST, OCI_INDEX)


class ManifestError(ValueError):
    """The manifest cannot be parsed; marking must fail closed."""


@dataclass(slots=True)
class References:
    kind: str
    blobs: list[bytes] = field(default_factory=list)  # config, layers, artifact blobs
    children: list[bytes] = field(default_factory=list)  # manifests of a list/index
    #: digests that are not sha256 (cannot name a blob of this store), kept for the report
    foreign: list[str] = field(default_factory=list)


def _descriptor(refs: References, item: Any, where: str, key: str = "digest") -> bytes | None:
    if not isinstance(item, dict):
        raise ManifestError(f"{where}: descriptor is not an object")
    text = item.get(key)
    if not isinstance(text, str):
        raise ManifestError(f"{where}: descriptor has no {key} string")
    algo = text.partition(":")[0]
    if algo in ("sha384", "sha512"):
        refs.foreign.append(text)
        return None
    try:
        return parse_digest(text)
    except InvalidDigest as exc:
        raise ManifestError(f"{where}: {exc}") from None


def _list(doc: dict[str, Any], key: str, required: bool) -> list[Any]:
    value = doc.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise ManifestError(f"'{key}' is {'missing' if value is None else 'not a list'}")
    return value


def parse(data: bytes) -> References:
    """The digests one manifest references; raises ManifestError on anything unexpected."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"not JSON: {exc}") from None
    except RecursionError:
        raise ManifestError("JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise ManifestError("not a JSON object")
    version = doc.get("schemaVersion")
    if version == 1:
        refs = References("schema1")
        for i, layer in enumerate(_list(doc, "fsLayers", True)):
            if (d := _descriptor(refs, layer, f"fsLayers[{i}]", "blobSum")) is not None:
                refs.blobs.append(d)
        return refs
    if version != 2:
        raise ManifestError(f"unrecognized manifest schema version {version!r}")
    media_type = doc.get("mediaType", "")
    if media_type == "":
        # OCI content may omit mediaType: an index if it has manifests, else an image manifest
        media_type = OCI_INDEX if isinstance(doc.get("manifests"), list) else OCI_MANIFEST
    if media_type in LISTS:
        refs = References(media_type)
        for i, child in enumerate(_list(doc, "manifests", True)):
            if (d := _descriptor(refs, child, f"manifests[{i}]")) is not None:
                refs.children.append(d)
        return refs
    if media_type in IMAGE_MANIFESTS:
        refs = References(media_type)
        if (d := _descriptor(refs, doc.get("config"), "config")) is not None:
            refs.blobs.append(d)
        for i, layer in enumerate(_list(doc, "layers", media_type == DOCKER_V2)):
            if (d := _descriptor(refs, layer, f"layers[{i}]")) is not None:
                refs.blobs.append(d)
        return refs
    if media_type == OCI_ARTIFACT:
        refs = References(media_type)
        for i, blob in enumerate(_list(doc, "blobs", False)):
            if (d := _descriptor(refs, blob, f"blobs[{i}]")) is not None:
                refs.blobs.append(d)
        return refs
    raise ManifestError(f"unrecognized manifest content type {str(media_type)[:100]!r}")


def packed_references(data: bytes) -> tuple[bytes, tuple[str, ...]]:
    """``parse``, packed to cross between processes cheaply: the raw digests it references
    concatenated, and the foreign digests it names."""
    refs = parse(data)
    return b"".join(refs.blobs) + b"".join(refs.children), tuple(refs.foreign)


def split_references(data: bytes) -> tuple[bytes, bytes]:
    """``parse``, packed: the raw digests of the blobs it references, then of its child
    manifests (each 32 bytes a digest, concatenated)."""
    refs = parse(data)
    return b"".join(refs.blobs), b"".join(refs.children)
