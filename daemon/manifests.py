"""Parse every manifest media type a registry stores -> the digests it references.

Mirrors distribution 2.8's manifest store: schemaVersion picks the family, then the
mediaType field (or, when absent, the shape) picks the parser; unknown kinds are errors.
Keys are matched as Go's encoding/json matches them (the registry and its clients read
manifests that way): case-insensitively, the last match winning.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from daemon.layout import FOREIGN_ALGORITHMS, InvalidDigest, is_foreign, parse_digest

DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_ARTIFACT = "application/vnd.oci.artifact.manifest.v1+json"
IMAGE_MANIFESTS = (DOCKER_V2, OCI_MANIFEST)
LISTS = (DOCKER_LIST, OCI_INDEX)

#: the keys this module reads, as the specs spell them
_READ = (
    "schemaVersion",
    "mediaType",
    "config",
    "layers",
    "manifests",
    "blobs",
    "fsLayers",
    "blobSum",
    "digest",
    "subject",
)
#: the spellings manifests carry (pairwise distinct under folding): an object with only
#: these keys has no two that Go would take for one field, so an exact lookup is Go's answer
_KNOWN = frozenset(
    (
        *_READ,
        "size",
        "urls",
        "annotations",
        "platform",
        "artifactType",
        "data",
        "name",
        "tag",
        "architecture",
        "history",
        "signatures",
    )
)


def _fold(key: str) -> str:
    """Go's simple case folding, as far as it can reach an ASCII name: lower case, and the
    two non-ASCII runes that fold onto ASCII letters (Kelvin sign: lower() does it; long s)."""
    return key.lower().replace("\u017f", "s")


_CANONICAL = {_fold(name): name for name in _KNOWN}
assert len(_CANONICAL) == len(_KNOWN), "known keys must not fold onto each other"


class ManifestError(ValueError):
    """The manifest cannot be parsed; marking must fail closed."""


class _Ambiguous(Exception):
    """Two keys of one object fold to a name read: only the document's order can tell which
    one Go takes (a dict keeps the first position of a repeated key, not the last)."""


@dataclass(slots=True)
class References:
    kind: str
    blobs: list[bytes] = field(default_factory=list)  # config, layers, artifact blobs
    children: list[bytes] = field(default_factory=list)  # manifests of a list/index
    #: blobs named by another algorithm ("sha512:<hex>"): the repository's
    #: _layers/<algorithm>/<hex>/link says which sha256 blob they are
    foreign_blobs: list[str] = field(default_factory=list)
    #: child manifests named by another algorithm (resolved like foreign_blobs)
    foreign_children: list[str] = field(default_factory=list)
    #: the OCI 1.1 subject's digest as written (a referrer keeps nothing by naming it)
    subject: str | None = None


def _get(obj: dict[str, Any], name: str) -> Any:
    """``obj[name]`` as Go reads it: exact spelling on the fast path, else by folding."""
    if obj.keys() <= _KNOWN:
        return obj.get(name)
    fold = _fold(name)
    found = [key for key in obj if _fold(key) == fold]
    if len(found) > 1:
        raise _Ambiguous(name)
    return obj[found[0]] if found else None


def _ordered_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object as Go decodes it: every key that folds to a known name lands under that
    name, in document order, so the last one wins."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        out[_CANONICAL.get(_fold(key), key)] = value
    return out


def _digest(item: Any, where: str, key: str = "digest") -> str:
    if not isinstance(item, dict):
        raise ManifestError(f"{where}: descriptor is not an object")
    text = _get(item, key)
    if not isinstance(text, str):
        raise ManifestError(f"{where}: descriptor has no {key} string")
    return text


def _foreign(text: str) -> bool:
    """True for a well-formed sha384/sha512 digest; ManifestError for a malformed one."""
    algo, _, hexpart = text.partition(":")
    if algo not in FOREIGN_ALGORITHMS:
        return False
    if not is_foreign(algo, hexpart):
        raise ManifestError(f"not a {algo} digest: {text[:150]!r}")
    return True


def _add(out: list[bytes], foreign: list[str], text: str, where: str) -> None:
    try:
        out.append(parse_digest(text))
    except InvalidDigest as exc:
        if not _foreign(text):
            raise ManifestError(f"{where}: {exc}") from None
        foreign.append(text)


_SHA256_HEX = re.compile(r"[0-9a-f]{64}").fullmatch


def _collect(
    items: list[Any], where: str, out: list[bytes], foreign: list[str], key: str = "digest"
) -> None:
    """The digest of each descriptor of ``items`` into ``out`` (sha256) or ``foreign``."""
    known = _KNOWN
    for i, item in enumerate(items):
        # the hot path, inline (once per layer of every manifest): a descriptor whose keys
        # are all known spellings, naming a canonical sha256 digest
        text = item.get(key) if type(item) is dict and item.keys() <= known else None
        if type(text) is str and len(text) == 71 and text[:7] == "sha256:" and _SHA256_HEX(text, 7):
            out.append(bytes.fromhex(text[7:]))
            continue
        name = f"{where}[{i}]"
        _add(out, foreign, _digest(item, name, key), name)


def _list(value: Any, key: str, required: bool) -> list[Any]:
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
    try:
        return _parse(doc)
    except _Ambiguous:
        pass
    # keys that differ only by case in one object: read again, in the document's order
    try:
        return _parse(json.loads(data, object_pairs_hook=_ordered_pairs))
    except _Ambiguous as exc:  # pragma: no cover - the hook leaves one key per folded name
        raise ManifestError(f"ambiguous key {exc}") from None


def parse_loaded(doc: Any, data: bytes) -> References:
    """``parse`` of ``data``, whose JSON the caller has already loaded as ``doc`` (verify
    reads the document for itself too: one load, not two)."""
    if isinstance(doc, dict):
        with contextlib.suppress(_Ambiguous):
            return _parse(doc)
    return parse(data)  # refused or ambiguous: parse words the error and reads in order


def _parse(doc: dict[str, Any]) -> References:
    if doc.keys() <= _KNOWN:
        get = doc.get  # the usual document: every key a known spelling, looked up as is
    else:

        def get(name: str) -> Any:
            return _get(doc, name)

    version = get("schemaVersion")
    if isinstance(version, bool):
        raise ManifestError(f"unrecognized manifest schema version {version!r}")
    if version == 1:
        refs = References("schema1")
        layers = _list(get("fsLayers"), "fsLayers", True)
        _collect(layers, "fsLayers", refs.blobs, refs.foreign_blobs, "blobSum")
        return refs
    if version != 2:
        raise ManifestError(f"unrecognized manifest schema version {version!r}")
    media_type = get("mediaType")
    if media_type is None or media_type == "":
        # OCI content may omit mediaType: an index if it has manifests, else an image manifest
        media_type = OCI_INDEX if isinstance(get("manifests"), list) else OCI_MANIFEST
    if media_type in LISTS:
        refs = References(media_type)
        children = _list(get("manifests"), "manifests", True)
        _collect(children, "manifests", refs.children, refs.foreign_children)
    elif media_type in IMAGE_MANIFESTS:
        refs = References(media_type)
        _add(refs.blobs, refs.foreign_blobs, _digest(get("config"), "config"), "config")
        layers = _list(get("layers"), "layers", media_type == DOCKER_V2)
        _collect(layers, "layers", refs.blobs, refs.foreign_blobs)
    elif media_type == OCI_ARTIFACT:
        refs = References(media_type)
        _collect(_list(get("blobs"), "blobs", False), "blobs", refs.blobs, refs.foreign_blobs)
    else:
        raise ManifestError(f"unrecognized manifest content type {str(media_type)[:100]!r}")
    subject = get("subject")
    if subject is not None:
        text = _digest(subject, "subject")
        try:
            parse_digest(text)
        except InvalidDigest as exc:
            if not _foreign(text):
                raise ManifestError(f"subject: {exc}") from None
        refs.subject = text
    return refs


def packed_references(data: bytes) -> tuple[bytes, bytes, tuple[str, ...], tuple[str, ...]]:
    """``parse``, packed to cross between processes cheaply: the raw blob digests and the raw
    child digests, each concatenated, then the foreign blob and child digests."""
    return _packed(parse(data))


def _packed(refs: References) -> tuple[bytes, bytes, tuple[str, ...], tuple[str, ...]]:
    return (
        b"".join(refs.blobs),
        b"".join(refs.children),
        tuple(refs.foreign_blobs),
        tuple(refs.foreign_children),
    )


def graph_references(
    data: bytes,
) -> tuple[tuple[bytes, bytes, tuple[str, ...], tuple[str, ...]], str | None]:
    """``packed_references`` (the mark's reading) and the subject as written: the untagged
    plan's reading. Here, not in daemon.untagged: a reader process that unpickles it imports
    this module alone (daemon.untagged pulled in structlog and the engine, ~0.2 s a reader)."""
    refs = parse(data)
    return _packed(refs), refs.subject


def split_references(data: bytes) -> tuple[bytes, bytes]:
    """``parse``, packed: the raw digests of the blobs it references, then of its child
    manifests (each 32 bytes a digest, concatenated)."""
    refs = parse(data)
    foreign = refs.foreign_blobs + refs.foreign_children
    if foreign:
        # this reading has no repository to resolve them through: never guess, fail closed
        raise ManifestError(
            f"references {', '.join(foreign[:3])}, which this reading cannot resolve"
        )
    return b"".join(refs.blobs), b"".join(refs.children)
