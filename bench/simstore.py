"""A simulated registry store: the shape of bench/synth.py's plan, served from arithmetic.

No disk, no network: every key, listing, size, mtime and manifest is computed when asked,
so the engine, the sources, the inventory and the sweep run unchanged on a store of any
size (bench/sim_check.py). The driver holds O(1) per blob: a bitmap of deleted blobs
(1 bit a blob) and the keys a run writes or deletes itself (lease, removed links).

Blobs are numbered by an ordinal ``o``: manifests [0, M), configs [M, 2M), unique layers
[2M, 2M + M(L-1)), shared layers, then orphans. A blob's digest is ``o % 256`` (its shard),
23 bytes of sha256 of the seed and ``o``, then ``o`` as 8 big-endian bytes: its shard's
blobs are ``o = shard + 256k``, in an order sorting alone reveals, and a digest says which
blob it is. Digests are not the sha256 of the content (nothing in a check or delete reads a
blob to hash it); manifests are real schema2 JSON that name the right configs and layers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from bench.synth import CONFIG, DOCKER_V2, LAYER, OLD, Plan, _repo_name
from daemon import layout
from daemon.storage.base import BlobEntry, DeleteFailure, Entry, NotFound, Storage, TooLarge
from daemon.usage import size_record

_REPO_INDEX = re.compile(r"app(\d+)$")
_BLOB_KEY = re.compile(r"blobs/sha256/[0-9a-f]{2}/([0-9a-f]{64})/data")
_TAG_CURRENT = re.compile(r"/_manifests/tags/v(\d+)/current/link$")
_HEX_LINK = re.compile(r"/sha256/([0-9a-f]{64})/link$")


@dataclass(frozen=True)
class Shape:
    """How many blobs of each kind, and where each kind's ordinals start."""

    repos: int
    per_repo: int
    layers: int  # per manifest: layers - 1 unique + 1 shared
    shared: int
    orphans: int

    @property
    def manifests(self) -> int:
        return self.repos * self.per_repo

    @property
    def configs_at(self) -> int:
        return self.manifests

    @property
    def layers_at(self) -> int:
        return 2 * self.manifests

    @property
    def shared_at(self) -> int:
        return self.layers_at + self.manifests * (self.layers - 1)

    @property
    def orphans_at(self) -> int:
        return self.shared_at + self.shared

    @property
    def blobs(self) -> int:
        return self.orphans_at + self.orphans


def shape_of(plan: Plan) -> Shape:
    return Shape(plan.repos, plan.manifests_per_repo, plan.layers, plan.shared, plan.orphans)


class SimStorage(Storage):
    """The store of ``plan``, computed: see the module's docstring."""

    concurrency = 16
    listing_proves_data = True

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.shape = shape_of(plan)
        self.description = f"simulated:{self.shape.blobs}"
        self._seed = plan.seed.to_bytes(8, "big")
        self._deleted = bytearray((self.shape.blobs + 7) // 8)  # a bit a blob
        self._own: dict[str, bytes] = {}  # keys a run writes (lease)
        self._gone: set[str] = set()  # link keys and prefixes a run removed

    # -- the arithmetic ----------------------------------------------------------------

    def digest(self, o: int) -> bytes:
        ob = o.to_bytes(8, "big")
        return bytes((o & 255,)) + hashlib.sha256(self._seed + ob).digest()[:23] + ob

    def ordinal(self, raw: bytes) -> int | None:
        o = int.from_bytes(raw[24:], "big")
        if o >= self.shape.blobs or self.digest(o) != raw:
            return None
        return o

    def _alive(self, o: int) -> bool:
        return not self._deleted[o >> 3] & (1 << (o & 7))

    def _shared_of(self, g: int) -> int:
        return self.shape.shared_at + int.from_bytes(self.digest(g)[1:5], "big") % self.shape.shared

    def references(self, g: int) -> list[int]:
        """Manifest ``g``'s config, then its layers (the last one shared where there are)."""
        s = self.shape
        unique = s.layers - 1
        refs = [s.configs_at + g, *range(s.layers_at + g * unique, s.layers_at + (g + 1) * unique)]
        if s.shared:
            refs.append(self._shared_of(g))
        return refs

    def manifest(self, g: int) -> bytes:
        """Manifest ``g`` as synth writes it (json.dumps with indent=3), from a template."""
        config, *layers = self.references(g)
        parts = [
            '{\n   "schemaVersion": 2,\n   "mediaType": "',
            DOCKER_V2,
            '",\n   "config": {\n      "mediaType": "',
            CONFIG,
            f'",\n      "size": {self.size(config)},\n      "digest": "sha256:',
            self.digest(config).hex(),
            '"\n   },\n   "layers": [',
        ]
        for i, layer in enumerate(layers):
            parts += [
                ",\n" if i else "\n",
                '      {\n         "mediaType": "',
                LAYER,
                f'",\n         "size": {self.size(layer)},\n         "digest": "sha256:',
                self.digest(layer).hex(),
                '"\n      }',
            ]
        parts.append("\n   ]\n}")
        return "".join(parts).encode()

    def size(self, o: int) -> int:
        if o < self.shape.manifests:
            return len(self.manifest(o))
        return 64 + self.digest(o)[1] % 193

    def content(self, o: int) -> bytes:
        if o < self.shape.manifests:
            return self.manifest(o)
        return bytes(self.size(o))

    def repo_of(self, name: str) -> int | None:
        found = _REPO_INDEX.search(name)
        if found is None:
            return None
        r = int(found.group(1))
        return r if r < self.shape.repos and _repo_name(r) == name else None

    def repo_keys(self, r: int, layers: bool) -> list[str]:
        """Repository ``r``'s keys as a scan names them."""
        s = self.shape
        root = f"{layout.REPOSITORIES}{_repo_name(r)}/"
        keys: list[str] = []
        linked: dict[int, None] = {}
        for m in range(s.per_repo):
            g = r * s.per_repo + m
            mhex = self.digest(g).hex()
            keys.append(f"{root}_manifests/revisions/sha256/{mhex}/link")
            keys.append(f"{root}_manifests/tags/v{m}/current/link")
            keys.append(f"{root}_manifests/tags/v{m}/index/sha256/{mhex}/link")
            if layers:
                linked.update(dict.fromkeys(self.references(g)))
        if layers:
            keys += [f"{root}_layers/sha256/{self.digest(o).hex()}/link" for o in linked]
        else:
            keys.append(f"{root}_layers/")
        return [k for k in keys if not self._removed(k)]

    def _removed(self, key: str) -> bool:
        if not self._gone:
            return False
        if key in self._gone:
            return True
        return any(key.startswith(p) for p in self._gone if p.endswith("/"))

    def shard_ordinals(self, shard: int) -> range:
        return range(shard, self.shape.blobs, 256)

    def _shard_entries(self, shard: str) -> Iterator[tuple[bytes, int]]:
        """(raw digest, ordinal) of each blob in ``shard``, in byte order, as an object store
        lists them. One shard's digests are held while it is listed (~73 bytes each: 1/256
        of the store, the driver's own transient), nothing else of the store."""
        digest, alive = self.digest, self._alive
        raws = sorted(digest(o) for o in self.shard_ordinals(int(shard, 16)) if alive(o))
        for raw in raws:
            yield raw, int.from_bytes(raw[24:], "big")

    # -- Storage -----------------------------------------------------------------------

    async def probe(self) -> None:
        return None

    async def list_blob_shard(self, shard: str) -> list[BlobEntry]:
        entries = [BlobEntry(raw.hex(), self.size(o), OLD) for raw, o in self._shard_entries(shard)]
        entries.sort(key=lambda e: e.hex)  # as an object store lists them
        return entries

    async def blobs_outside(
        self, shard: str, members: AbstractSet[bytes]
    ) -> tuple[int, list[BlobEntry]]:
        count = 0
        outside: list[BlobEntry] = []
        for raw, o in self._shard_entries(shard):
            count += 1
            if raw not in members:
                outside.append(BlobEntry(raw.hex(), self.size(o), OLD))
        return count, outside

    async def blobs_outside_sized(
        self, shard: str, members: AbstractSet[bytes]
    ) -> tuple[int, list[BlobEntry], bytes]:
        count = 0
        outside: list[BlobEntry] = []
        sized = bytearray()
        for raw, o in self._shard_entries(shard):
            count += 1
            if raw not in members:
                outside.append(BlobEntry(raw.hex(), self.size(o), OLD))
            else:
                sized += size_record(raw, self.size(o))
        return count, outside, bytes(sized)

    def _blob(self, key: str) -> int | None:
        found = _BLOB_KEY.fullmatch(key)
        if found is None:
            return None
        o = self.ordinal(bytes.fromhex(found.group(1)))
        return o if o is not None and self._alive(o) else None

    def _link(self, key: str) -> bytes | None:
        """What the link ``key`` holds, None where there is no such link."""
        if not key.startswith(layout.REPOSITORIES) or self._removed(key):
            return None
        rest = key[len(layout.REPOSITORIES) :]
        name = rest.split("/_", 1)[0]
        r = self.repo_of(name)
        if r is None:
            return None
        s = self.shape
        tag = _TAG_CURRENT.search(key)
        if tag is not None:
            m = int(tag.group(1))
            return self.digest(r * s.per_repo + m) if m < s.per_repo else None
        found = _HEX_LINK.search(key)
        if found is None:
            return None
        raw = bytes.fromhex(found.group(1))
        o = self.ordinal(raw)
        if o is None:
            return None
        first = r * s.per_repo
        mine = range(first, first + s.per_repo)
        if "/_manifests/" in key:
            return raw if o in mine else None
        if "/_layers/" in key and any(o in self.references(g) for g in mine):
            return raw
        return None

    async def stat(self, key: str) -> Entry | None:
        if key in self._own:
            return Entry(key, len(self._own[key]), OLD)
        o = self._blob(key)
        if o is not None:
            return Entry(key, self.size(o), OLD)
        return Entry(key, 71, OLD) if self._link(key) is not None else None

    def _read(self, key: str, limit: int) -> bytes:
        data = self._own.get(key)
        if data is None:
            o = self._blob(key)
            if o is not None:
                data = self.content(o)
            else:
                raw = self._link(key)
                if raw is None:
                    raise NotFound(key)
                data = f"sha256:{raw.hex()}".encode()
        if len(data) > limit:
            raise TooLarge(key)
        return data

    async def read(self, key: str, limit: int) -> bytes:
        return self._read(key, limit)

    async def read_many(self, keys: Sequence[str], limit: int) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            try:
                out.append(self._read(key, limit))
            except NotFound:
                out.append(None)
        return out

    async def walk(self, prefix: str) -> AsyncIterator[list[Entry]]:
        if prefix == layout.REPOSITORIES:
            for r in range(self.shape.repos):
                yield [Entry(k, 71, OLD) for k in self.repo_keys(r, True)]
            return
        own = [Entry(k, len(v), OLD) for k, v in self._own.items() if k.startswith(prefix)]
        if own:
            yield own

    async def scan_repositories(self, layers: bool = True) -> AsyncIterator[list[str]]:
        for r in range(self.shape.repos):
            yield self.repo_keys(r, layers)

    async def list_dir(self, prefix: str) -> tuple[list[str], list[str]]:
        files, dirs = set(), set()
        for key in self._own:
            if key.startswith(prefix):
                head, sep, _ = key[len(prefix) :].partition("/")
                (dirs if sep else files).add(head)
        return sorted(files), sorted(dirs)

    async def write(self, key: str, data: bytes) -> None:
        self._own[key] = bytes(data)

    async def delete_blobs(self, hexes: Sequence[str]) -> list[DeleteFailure]:
        for hexdigest in hexes:
            o = self.ordinal(bytes.fromhex(hexdigest))
            if o is not None:
                self._deleted[o >> 3] |= 1 << (o & 7)
        return []

    async def delete_keys(self, keys: Sequence[str]) -> list[DeleteFailure]:
        for key in keys:
            if self._own.pop(key, None) is None and key.startswith(layout.REPOSITORIES):
                self._gone.add(key)
        return []

    async def delete_tree(self, prefix: str) -> list[DeleteFailure]:
        for key in [k for k in self._own if k.startswith(prefix)]:
            del self._own[key]
        if prefix.startswith(layout.REPOSITORIES):
            self._gone.add(prefix)
        return []

    def location(self, key: str) -> str:
        return f"sim://{key}"

    def alive_blobs(self) -> int:
        """Blobs not deleted (a bench's check that a delete did what it said)."""
        return self.shape.blobs - sum(bin(b).count("1") for b in self._deleted)
