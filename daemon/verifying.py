"""What verify reads in a manifest, where the driver parses (possibly a reader process).

Two readings of one content: the typed parse (daemon.manifests, the one the mark phase
trusts) and, independently, every digest-shaped string anywhere in the bytes. Imports
nothing heavy (no asyncio): reader processes load this module.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from daemon import layout, manifests
from daemon.storage.reading import stat_file

# any case (matched on the lowered bytes: IGNORECASE made this regex most of a manifest's
# reading time), anywhere: keys, values, strings inside strings; a longer hex run is no digest
# (no look-behind: it cost four times the rest; "xsha256:<hex>" is read as a digest too,
# which only ever adds a string to check)
_DIGESTS = re.compile(rb"sha(?:256:[0-9a-f]{64}|512:[0-9a-f]{128})(?![0-9a-f])")
_TEXT_DIGESTS = re.compile(_DIGESTS.pattern.decode())
#: subtrees whose digests describe, and never require, content: a base image's digest in an
#: annotation, a parent image id in schema1's history
NOTES = frozenset({"annotations", "history", "labels"})

TypedParse = Callable[[bytes], manifests.References]


@dataclass(frozen=True, slots=True)
class Facts:
    """One manifest as verify needs it (compact: it crosses between processes)."""

    length: int
    kind: str = ""
    blobs: bytes = b""  # raw 32-byte digests the typed parse found: config, layers, blobs
    children: bytes = b""  # child manifests of a list/index
    subjects: bytes = b""  # the OCI 1.1 subject a referrer is about
    sizes: tuple[tuple[str, int], ...] = ()  # descriptor sizes where one is given, by digest
    foreign: tuple[str, ...] = ()  # non-sha256 digests the typed parse named
    loose: tuple[str, ...] = ()  # digest strings the typed parse did not explain
    noted: int = 0  # digest strings only in annotations/history: counted, not checked
    error: str = ""  # why the typed parse refused it

    def size_of(self, raw: bytes) -> int | None:
        text = "sha256:" + raw.hex()
        for digest, size in self.sizes:
            if digest == text:
                return size
        return None


def _descriptor(value: Any) -> tuple[str, int] | None:
    if not isinstance(value, dict):
        return None
    digest, size = value.get("digest"), value.get("size")
    if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool):
        return None
    return digest, size


def _sizes(doc: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    """Descriptor sizes one level down, whatever the key is called."""
    out: list[tuple[str, int]] = []
    for value in doc.values():
        items = value if isinstance(value, list) else [value]
        for item in items:
            found = _descriptor(item)
            if found is not None:
                out.append(found)
    return tuple(out)


def _subjects(doc: dict[str, Any]) -> bytes:
    raws = []
    for key, value in doc.items():
        text = value.get("digest") if isinstance(value, dict) else None
        if key.lower() == "subject" and isinstance(text, str):
            with contextlib.suppress(layout.InvalidDigest):
                raws.append(layout.parse_digest(text))
    return b"".join(raws)


def _strings(value: Any, noted: bool) -> Iterator[tuple[str, bool]]:
    """Every string (keys too) with whether it sits below an annotations-like key."""
    if isinstance(value, str):
        yield value, noted
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, noted)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key, noted
            yield from _strings(item, noted or key.lower() in NOTES)


def read_facts(typed: TypedParse, data: bytes) -> Facts:
    """Both readings of one manifest; never raises on bad content (that is a finding)."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        doc = None
    refs: manifests.References | None = None
    error = ""
    try:
        refs = typed(data)
    except (manifests.ManifestError, ValueError) as exc:
        error = str(exc) or type(exc).__name__
    blobs = b"".join(refs.blobs) if refs else b""
    children = b"".join(refs.children) if refs else b""
    named = (refs.foreign_blobs + refs.foreign_children) if refs else []
    foreign = tuple(f.lower() for f in named)
    subjects = _subjects(doc) if isinstance(doc, dict) else b""
    explained = {
        layout.format_digest(part[i : i + 32])
        for part in (blobs, children, subjects)
        for i in range(0, len(part), 32)
    }
    explained.update(foreign)
    if refs is not None and refs.subject and not refs.subject.startswith("sha256:"):
        explained.add(refs.subject.lower())  # a sha384/sha512 subject the parser read
    hits = {m.decode("ascii") for m in _DIGESTS.findall(data.lower())} - explained
    loose: set[str] = set()
    noted = 0
    if hits:
        if isinstance(doc, (dict, list)):
            # the rare slow path: which of them sit outside annotations and history
            outside: set[str] = set()
            for text, is_note in _strings(doc, False):
                if not is_note:
                    outside.update(_TEXT_DIGESTS.findall(text.lower()))
            loose = hits & outside
            noted = len(hits - outside)
        else:
            loose = hits
    return Facts(
        length=len(data),
        kind=refs.kind if refs else "",
        blobs=blobs,
        children=children,
        subjects=subjects,
        sizes=_sizes(doc) if isinstance(doc, dict) else (),
        foreign=foreign,
        loose=tuple(sorted(loose)),
        noted=noted,
        error=error,
    )


def blob_sizes(base: str, hexes: list[str]) -> list[int | None]:
    """In a reader process: the data size of each blob, None where it has no data."""
    out: list[int | None] = []
    for hexdigest in hexes:
        entry = stat_file(base, layout.blob_data(hexdigest))
        out.append(None if entry is None else entry.size)
    return out
