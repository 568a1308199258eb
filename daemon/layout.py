"""The distribution v2 storage path scheme, both ways (digest <-> key, key -> kind).

Keys are '/'-separated and relative to ``<rootdirectory>/docker/registry/v2/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

V2_ROOT = "docker/registry/v2"
BLOBS = "blobs/sha256/"
REPOSITORIES = "repositories/"
#: the pruner's own keys (lease, trash): never registry data; only a kept trash outlives a run
OWN = "_registry-pruned/"
SHARDS = tuple(f"{i:02x}" for i in range(256))
#: the digest algorithms go-digest (and so the registry) accepts besides sha256: hex length.
#: A blob named by one is stored under its sha256 path; the repository links the other name
#: at ``_layers/<algorithm>/<hex>/link``, which holds ``sha256:<canonical hex>``
FOREIGN_ALGORITHMS = {"sha384": 96, "sha512": 128}

_HEX = re.compile(r"[0-9a-f]{64}")
_ANYHEX = re.compile(r"[0-9a-f]+")
# distribution's repository name grammar (reference.NameRegexp), per path component.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*")


class InvalidDigest(ValueError):
    """A string that is not a canonical ``sha256:<64 hex>`` digest."""


def is_hex(value: str) -> bool:
    return _HEX.fullmatch(value) is not None


def parse_digest(text: str) -> bytes:
    """``sha256:<hex>`` -> 32 raw bytes; anything else raises InvalidDigest."""
    # the exact canonical form first: once per layer reference, the mark phase's hot path
    if len(text) == 71 and text.startswith("sha256:") and _HEX.fullmatch(text, 7):
        return bytes.fromhex(text[7:])
    algo, sep, hexpart = text.strip().partition(":")
    if algo != "sha256" or not sep or not is_hex(hexpart):
        raise InvalidDigest(f"not a sha256 digest: {text[:100]!r}")
    return bytes.fromhex(hexpart)


def link_digest(content: bytes) -> bytes:
    """A link file's content -> the raw digest it names; InvalidDigest if it names none."""
    return parse_digest(content.decode("ascii", "replace"))


def format_digest(raw: bytes) -> str:
    return "sha256:" + raw.hex()


def blob_dir(hexdigest: str) -> str:
    return f"{BLOBS}{hexdigest[:2]}/{hexdigest}/"


def blob_data(hexdigest: str) -> str:
    return blob_dir(hexdigest) + "data"


def is_repository_name(name: str) -> bool:
    """True when ``name`` is a valid distribution repository name (no traversal possible)."""
    if not name or len(name) > 255:
        return False
    return all(_COMPONENT.fullmatch(part) for part in name.split("/"))


def repository_root(name: str) -> str:
    return f"{REPOSITORIES}{name}/"


def revision_dir(name: str, hexdigest: str) -> str:
    return f"{REPOSITORIES}{name}/_manifests/revisions/sha256/{hexdigest}/"


def layer_link_dir(name: str, hexdigest: str) -> str:
    return f"{REPOSITORIES}{name}/_layers/sha256/{hexdigest}/"


def foreign_layer_link_dir(name: str, digest: str) -> str:
    """The layer link directory of ``<algorithm>:<hex>`` (any algorithm) in ``name``."""
    algo, _, hexpart = digest.partition(":")
    return f"{REPOSITORIES}{name}/_layers/{algo}/{hexpart}/"


def foreign_revision_dir(name: str, digest: str) -> str:
    """Where a revision named ``<algorithm>:<hex>`` would be linked in ``name``."""
    algo, _, hexpart = digest.partition(":")
    return f"{REPOSITORIES}{name}/_manifests/revisions/{algo}/{hexpart}/"


def is_foreign(algo: str, hexpart: str) -> bool:
    """True for a well-formed sha384/sha512 pair (lower-case hex of the right length)."""
    size = FOREIGN_ALGORITHMS.get(algo)
    return size is not None and len(hexpart) == size and _ANYHEX.fullmatch(hexpart) is not None


def upload_dir(name: str, uuid: str) -> str:
    return f"{REPOSITORIES}{name}/_uploads/{uuid}/"


@dataclass(frozen=True, slots=True)
class RepoKey:
    """What a key under ``repositories/`` is."""

    #: revision | tag_current | tag_index | layer | layers_unlisted | upload_startedat |
    #: upload_other | foreign_layer | foreign_revision
    kind: str
    repository: str
    #: revision, tag_index, layer; "<algorithm>:<hex>" for foreign_layer, foreign_revision
    digest_hex: str = ""
    tag: str = ""  # tag_current, tag_index
    upload: str = ""  # upload_*


def classify_repo_key(key: str) -> RepoKey | None:
    """Classify a file key below ``repositories/``; None for anything the scheme does not name."""
    if not key.startswith(REPOSITORIES):
        return None
    parts = key[len(REPOSITORIES) :].split("/")
    i = next((n for n, p in enumerate(parts) if p in ("_manifests", "_layers", "_uploads")), -1)
    if i < 0:
        return None
    repo = "/".join(parts[:i])
    # object stores accept any key: a name that could climb out of the tree is not a repository
    if not repo or any(part in ("", ".", "..") for part in parts[:i]):
        return None
    section, rest = parts[i], parts[i + 1 :]
    if section == "_layers":
        if rest == [""]:
            # the directory itself: a scan asked not to list layer links names it instead
            return RepoKey("layers_unlisted", repo)
        if len(rest) == 3 and rest[0] == "sha256" and rest[2] == "link" and is_hex(rest[1]):
            return RepoKey("layer", repo, digest_hex=rest[1])
        if len(rest) == 3 and rest[2] == "link" and is_foreign(rest[0], rest[1]):
            return RepoKey("foreign_layer", repo, digest_hex=f"{rest[0]}:{rest[1]}")
        return None
    if section == "_uploads":
        if len(rest) >= 2:
            kind = "upload_startedat" if rest[1:] == ["startedat"] else "upload_other"
            return RepoKey(kind, repo, upload=rest[0])
        return None
    # _manifests
    if (
        len(rest) == 4
        and rest[0] == "revisions"
        and rest[1] == "sha256"
        and rest[3] == "link"
        and is_hex(rest[2])
    ):
        return RepoKey("revision", repo, digest_hex=rest[2])
    if len(rest) == 4 and rest[0] == "revisions" and rest[3] == "link" and is_foreign(*rest[1:3]):
        return RepoKey("foreign_revision", repo, digest_hex=f"{rest[1]}:{rest[2]}")
    if len(rest) == 4 and rest[0] == "tags" and rest[2:] == ["current", "link"]:
        return RepoKey("tag_current", repo, tag=rest[1])
    if (
        len(rest) == 6
        and rest[0] == "tags"
        and rest[2] == "index"
        and rest[3] == "sha256"
        and rest[5] == "link"
        and is_hex(rest[4])
    ):
        return RepoKey("tag_index", repo, tag=rest[1], digest_hex=rest[4])
    return None
