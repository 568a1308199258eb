"""Per-repository usage: which repositories reference which blobs, and what that weighs.

The mark phase records one (blob, repository) pair per blob a repository references, as a
9-byte record in the blob's shard (6 bytes of digest after the shard byte, 3 of repository
index): no set of names per blob. The sweep, which lists each shard with its sizes, joins the
shard's pairs with the sizes of its in-use blobs: a blob named by one repository is that
repository's exclusive bytes, one named by several is shared by each of them.
"""

from __future__ import annotations

import re
import struct
from array import array
from collections.abc import Iterable
from typing import Any

from daemon.inventory import Inventory
from daemon.units import bytes_size

_KEY = 6  # digest bytes after the shard byte: 48 bits among a shard's few thousand blobs
_INDEX = 3  # bytes of repository index: 16.7 million repositories
_PAIR = _KEY + _INDEX
_PAIRS = re.compile(rb".{%d}" % _PAIR, re.DOTALL)
_DIGESTS = re.compile(rb".{32}", re.DOTALL)
#: an in-use blob's size, as a reader sends it back: the digest key, then 8 bytes of size
SIZED = struct.Struct(f"<{_KEY}sQ")
SHARED = -1


def size_record(raw: bytes, size: int) -> bytes:
    """The record that tells the sweep one in-use blob's size."""
    return SIZED.pack(raw[1 : 1 + _KEY], size)


class UsagePairs:
    """(blob, repository) pairs of the mark phase, deduplicated per shard in ~9 bytes each."""

    _FLUSH = 1 << 13

    def __init__(self, inventory: Inventory) -> None:
        self.names: list[str] = list(inventory.repositories)
        if len(self.names) >= 1 << (8 * _INDEX):
            raise ValueError(f"usage counts at most {1 << (8 * _INDEX)} repositories")
        self.index: dict[str, int] = {name: i for i, name in enumerate(self.names)}
        repos = inventory.repositories.values()
        self.tags = array("q", (len(r.tags) for r in repos))
        self.manifests = array("q", (len(r.revisions) for r in repos))
        self._pending: set[bytes] = set()  # shard byte + pair record
        self._runs: list[bytes] = [b""] * 256
        self._tails: list[bytearray] = [bytearray() for _ in range(256)]

    def add(self, repository: str, raw: bytes) -> None:
        """``repository`` references the blob ``raw`` (a 32-byte digest)."""
        self._pending.add(raw[: 1 + _KEY] + self.index[repository].to_bytes(_INDEX, "little"))
        if len(self._pending) >= self._FLUSH:
            self._flush()

    def add_packed(self, repository: str, packed: bytes) -> None:
        """``repository`` references each 32-byte digest concatenated in ``packed``."""
        tag = self.index[repository].to_bytes(_INDEX, "little")
        self._pending.update(d[: 1 + _KEY] + tag for d in _DIGESTS.findall(packed))
        if len(self._pending) >= self._FLUSH:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, set()
        tails = self._tails
        for item in pending:
            tails[item[0]] += item[1:]
        for shard in {item[0] for item in pending}:
            # amortised: a shard's unmerged part may grow to half its merged part
            if len(tails[shard]) > max(64 * _PAIR, len(self._runs[shard]) // 2):
                self._merge(shard)

    def _merge(self, shard: int) -> None:
        if self._tails[shard]:
            records = set(_PAIRS.findall(self._runs[shard]))
            records.update(_PAIRS.findall(self._tails[shard]))
            self._runs[shard] = b"".join(records)
            self._tails[shard] = bytearray()

    def take(self, shard: int) -> bytes:
        """The shard's pairs, each once; they are released (the sweep reads a shard once)."""
        self._flush()
        self._merge(shard)
        run, self._runs[shard] = self._runs[shard], b""
        return run


class UsageTally:
    """Per-repository sums the sweep fills shard by shard."""

    def __init__(self, pairs: UsagePairs, cutoff: float) -> None:
        self.pairs = pairs
        self.cutoff = cutoff
        n = len(pairs.names)
        self.blobs = array("q", bytes(8 * n))
        self.bytes = array("q", bytes(8 * n))
        self.exclusive = array("q", bytes(8 * n))
        self.exclusive_blobs = array("q", bytes(8 * n))
        self.shared = array("q", bytes(8 * n))
        self.in_use = [0, 0]  # blobs, bytes
        self.shared_total = [0, 0]
        self.too_young = [0, 0]

    def account(self, shard: int, sized: bytes, outside: Iterable[Any] = ()) -> None:
        """Join the shard's pairs with its in-use blobs' sizes (``SIZED`` records)."""
        sizes = dict(SIZED.iter_unpack(sized))
        self.in_use[0] += len(sizes)
        self.in_use[1] += sum(sizes.values())
        pairs = _PAIRS.findall(self.pairs.take(shard))
        owners: dict[bytes, int] = {}
        for record in pairs:
            key = record[:_KEY]
            repo = int.from_bytes(record[_KEY:], "little")
            if owners.setdefault(key, repo) != repo:
                owners[key] = SHARED
        for key, owner in owners.items():
            if owner == SHARED and key in sizes:
                self.shared_total[0] += 1
                self.shared_total[1] += sizes[key]
        for record in pairs:
            key = record[:_KEY]
            size = sizes.get(key)
            if size is None:
                continue  # a referenced blob the store does not hold: it weighs nothing
            repo = int.from_bytes(record[_KEY:], "little")
            self.blobs[repo] += 1
            self.bytes[repo] += size
            if owners[key] == SHARED:
                self.shared[repo] += size
            else:
                self.exclusive[repo] += size
                self.exclusive_blobs[repo] += 1
        for entry in outside:
            # the same rule as the engine's: no data yet, or newer than the grace period
            if entry.size is None or entry.mtime is None or entry.mtime > self.cutoff:
                self.too_young[0] += 1
                self.too_young[1] += entry.size or 0

    def document(self, orphaned: tuple[int, int]) -> dict[str, Any]:
        """The usage report: totals, and every repository by exclusive bytes, largest first."""
        p = self.pairs
        rows = [
            {
                "repository": name,
                "tags": p.tags[i],
                "manifests": p.manifests[i],
                "blobs": self.blobs[i],
                "bytes": self.bytes[i],
                "exclusive_blobs": self.exclusive_blobs[i],
                "exclusive_bytes": self.exclusive[i],
                "shared_bytes": self.shared[i],
            }
            for i, name in enumerate(p.names)
        ]
        rows.sort(key=lambda r: (-r["exclusive_bytes"], -r["bytes"], r["repository"]))
        return {
            "totals": {
                "repositories": len(rows),
                "in_use": {"blobs": self.in_use[0], "bytes": self.in_use[1]},
                "shared": {"blobs": self.shared_total[0], "bytes": self.shared_total[1]},
                "orphaned": {"blobs": orphaned[0], "bytes": orphaned[1]},
                "too_young": {"blobs": self.too_young[0], "bytes": self.too_young[1]},
            },
            "repositories": rows,
        }


def top(document: dict[str, Any], n: int | None) -> dict[str, Any]:
    """The report with only its ``n`` first repositories (all when ``n`` is None)."""
    if n is None:
        return document
    return {**document, "repositories": document["repositories"][: max(0, n)]}


def table(document: dict[str, Any]) -> str:
    """The report as a table for a terminal, then the store's totals."""
    header = ("REPOSITORY", "TAGS", "MANIFESTS", "BLOBS", "SIZE", "EXCLUSIVE", "SHARED")
    rows = [
        (
            r["repository"],
            str(r["tags"]),
            str(r["manifests"]),
            str(r["blobs"]),
            bytes_size(r["bytes"]),
            bytes_size(r["exclusive_bytes"]),
            bytes_size(r["shared_bytes"]),
        )
        for r in document["repositories"]
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        rest = zip(row[1:], widths[1:], strict=True)
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in rest]
        return "  ".join(cells).rstrip()

    out = [line(header), *map(line, rows)]
    totals = document["totals"]
    shown = len(rows)
    if shown < totals["repositories"]:
        out.append(f"({shown} of {totals['repositories']} repositories shown)")
    out.append("")
    for label, key in (
        ("In use", "in_use"),
        ("Shared", "shared"),
        ("Orphaned", "orphaned"),
        ("Too young", "too_young"),
    ):
        part = totals[key]
        out.append(f"{label + ':':<11}{bytes_size(part['bytes']):>11} in {part['blobs']} blobs")
    return "\n".join(out)
