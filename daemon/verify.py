"""Verify: is every kept image whole? (OpenShift's ``-restore-mode=check``, and the proof
that follows every delete run.)

The storage reading: every linked revision and every tag's current manifest, its blobs
(present, sizes as the descriptors say), its children recursively and a referrer's subject;
beside the typed parse, every digest-shaped string of the manifest (daemon.verifying).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from array import array
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog

from daemon import layout, manifests, packed
from daemon.findings import Finding, Verification
from daemon.inventory import DigestSet, Inventory
from daemon.progress import Progress
from daemon.storage.base import Storage
from daemon.verifying import SIZE_WANT, Facts, TypedParse, read_facts
from daemon.workers import in_parallel

VERIFY = "verify"
RECOVER = "recover"
MANIFEST_LIMIT = 4 * 1024 * 1024  # distribution refuses larger manifest payloads
CHUNK = 128
TAG_CHUNK = 512  # a tag link is ~71 bytes: the call, not the data, is what costs
EXAMPLES = 10
T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class Prior:
    """What a delete run already knows, so that its verification walks nothing again."""

    in_use: DigestSet
    #: first bytes of the shards whose listing held every in-use digest (trusted only where
    #: a listing proves a blob has data: object stores list ``data`` keys)
    complete: frozenset[int]
    deleted: set[bytes]
    removed_repositories: set[str]
    removed_revisions: set[tuple[str, str]]
    #: whether the store's tag links name images: not with the openshift source, where
    #: image streams hold the tags and a stored tag may name a manifest pruned long ago
    tags: bool = True


async def sizes_of(
    storage: Storage, wanted: dict[int, set[bytes]], progress: Progress, workers: int
) -> dict[bytes, int]:
    """The data size of each wanted blob (by shard) that has data, shards in parallel."""
    found: dict[bytes, int] = {}
    progress.shards_total = len(wanted)
    progress.shards_done = 0

    async def ask(shard: int) -> None:
        found.update(await storage.blob_sizes(f"{shard:02x}", wanted[shard]))
        progress.blobs_scanned += len(wanted[shard])
        progress.shards_done += 1

    await in_parallel(sorted(wanted), ask, workers)
    return found


def _digests(packed: bytes) -> list[bytes]:
    return [packed[i : i + 32] for i in range(0, len(packed), 32)]


def _compact(facts: Facts) -> Facts:
    """Facts as held until judged, one a manifest: sizes as 8-byte records, not int objects."""
    sizes: Sequence[int | None] = facts.sizes
    if packed.NO_SIZE not in sizes:
        with contextlib.suppress(OverflowError):  # past int64: kept as they are
            sizes = packed.PackedSizes(sizes)
    return facts._replace(kind=sys.intern(facts.kind), sizes=sizes)


def _wanted(facts: Facts) -> Sequence[int]:
    """The size each of a manifest's blobs must have, in their order: ``NO_SIZE`` where no
    descriptor gives one, -1 where the judging compares it itself (beyond int64)."""
    count = len(facts.blobs) // 32
    sizes = facts.sizes
    if isinstance(sizes, packed.PackedSizes):
        return array("q", sizes.data[: 8 * count])
    # kept as a tuple: a size past int64, or one equal to NO_SIZE (a hostile manifest)
    return [-1 if s is not None else packed.NO_SIZE for s in list(sizes)[:count]]


def tag_link(repository: str, tag: str) -> str:
    return f"{layout.REPOSITORIES}{repository}/_manifests/tags/{tag}/current/link"


def loose_keys(repositories: Iterable[str], digest: str) -> list[str]:
    """Where a digest string could name something of this store: blob data, layer links."""
    algo, _, hexdigest = digest.partition(":")
    keys = [f"blobs/{algo}/{hexdigest[:2]}/{hexdigest}/data"]
    keys += [f"{layout.REPOSITORIES}{r}/_layers/{algo}/{hexdigest}/link" for r in repositories]
    return keys


class StoreVerifier:
    """The storage reading of verify, over an inventory (and a delete run's knowledge)."""

    name = VERIFY

    def __init__(
        self,
        storage: Storage,
        progress: Progress,
        report: Callable[[Finding], None],
        *,
        log: structlog.typing.FilteringBoundLogger | None = None,
        workers: int = 16,
        typed: TypedParse = manifests.parse,
        prior: Prior | None = None,
    ) -> None:
        self.storage = storage
        self.progress = progress
        self.report = report
        self.log = log or structlog.get_logger()
        self.workers = max(1, workers)
        # module-level, so that a reader process can run it (tests pass a blind one)
        self.read = functools.partial(read_facts, typed)
        self.prior = prior
        self.result = Verification(after_delete=prior is not None)
        self.facts: dict[bytes, Facts | None] = {}
        #: referenced blobs without data (None), or whose size not every descriptor gives
        #: (that size), and manifests read as blobs (their length); any other has data of the
        #: size each descriptor wants, or lies in a shard a delete's listing proved
        self.exceptions: dict[bytes, int | None] = {}
        self.foreign_present: set[str] = set()  # sha512/sha384 blobs with data

    async def run(self, inventory: Inventory) -> Verification:
        self.progress.enter(self.name)
        roots = await self._roots(inventory)
        await self._read_manifests({raw for digests in roots.values() for raw in digests})
        await self._presence()
        named = await self._named(roots)
        self._judge(roots, named)
        self.log.info("verified", **self.result.document())
        return self.result

    # -- roots ------------------------------------------------------------------------------

    async def _roots(self, inventory: Inventory) -> dict[str, set[bytes]]:
        """Per repository: its linked revisions and its tags' current manifests."""
        prior = self.prior
        revisions: list[tuple[str, str]] = []
        tags: list[tuple[str, str]] = []
        for repo in inventory.repositories.values():
            if prior is not None and repo.name in prior.removed_repositories:
                continue
            for hexdigest in sorted(repo.revisions):
                if prior is None or (repo.name, hexdigest) not in prior.removed_revisions:
                    revisions.append((repo.name, hexdigest))
            if prior is None or prior.tags:
                tags += [(repo.name, tag) for tag in sorted(repo.tags)]
        roots: dict[str, set[bytes]] = {}
        linked: set[tuple[str, bytes]] = set()
        # a local: every tag's target, held only until the unlinked ones are known
        tag_targets: list[tuple[str, str, bytes]] = []

        async def read_revisions(chunk: list[tuple[str, str]]) -> list[bytes]:
            keys = [layout.revision_dir(r, h) + "link" for r, h in chunk]
            found = await self.storage.read_parsed(keys, 1024, layout.link_digest)
            accepted: list[bytes] = []
            for (repo, hexdigest), raw in zip(chunk, found, strict=True):
                if raw is None:
                    continue  # the scan named a directory whose link is gone: no revision
                if isinstance(raw, ValueError) or raw.hex() != hexdigest:
                    self._broken_link(repo, f"revision link of sha256:{hexdigest}", raw)
                    continue
                roots.setdefault(repo, set()).add(raw)
                linked.add((repo, raw))
                accepted.append(raw)
            return accepted

        async def read_tags(chunk: list[tuple[str, str]]) -> list[bytes]:
            keys = [tag_link(r, t) for r, t in chunk]
            found = await self.storage.read_parsed(keys, 1024, layout.link_digest)
            for (repo, tag), raw in zip(chunk, found, strict=True):
                if raw is None:
                    continue  # a tag directory without current link: distribution lists no tag
                self.result.tags += 1
                if isinstance(raw, ValueError):
                    self._broken_link(repo, f"current link of tag {tag!r}", raw)
                    continue
                roots.setdefault(repo, set()).add(raw)
                tag_targets.append((repo, tag, raw))
            return [raw for raw in found if isinstance(raw, bytes)]

        # links and the manifests they name in one pipeline, as the mark phase reads them:
        # each chunk's new manifests are read by the worker that read its links. Tags come
        # last, in larger chunks: what they name is nearly always a revision read by then,
        # so a tag chunk is one small read per tag and no manifest (fewer calls to readers)
        work: list[Callable[[], Awaitable[list[bytes]]]] = [
            *(functools.partial(read_revisions, chunk) for chunk in chunked(revisions)),
            *(functools.partial(read_tags, chunk) for chunk in chunked(tags, TAG_CHUNK)),
        ]

        async def links_then_manifests(step: Callable[[], Awaitable[list[bytes]]]) -> None:
            named = [raw for raw in await step() if raw not in self.facts]
            self.facts.update(dict.fromkeys(named))  # claimed: no other worker reads them
            await self._read_chunk(named)

        await in_parallel(work, links_then_manifests, self.workers)
        # a tag whose manifest has no revision link cannot be pulled: distribution reads
        # manifests through the repository's revision links
        self._unlinked = {
            (repo, tag, raw) for repo, tag, raw in tag_targets if (repo, raw) not in linked
        }
        return roots

    def _broken_link(self, repo: str, what: str, raw: bytes | ValueError) -> None:
        reason = (
            f"{what} is corrupt: {raw}"
            if isinstance(raw, ValueError)
            else (f"{what} names {layout.format_digest(raw)}")
        )
        self.result.broken += 1
        self.report(Finding("broken", repo, "", reason, f'Broken repository "{repo}": {reason}'))

    # -- reading ----------------------------------------------------------------------------

    async def _read_chunk(self, chunk: list[bytes]) -> None:
        if not chunk:
            return
        keys = [layout.blob_data(raw.hex()) for raw in chunk]
        found = await self.storage.read_parsed(keys, MANIFEST_LIMIT, self.read)
        for raw, facts in zip(chunk, found, strict=True):
            # read_facts never raises: a ValueError here came from the driver
            if isinstance(facts, Facts):
                self.facts[raw] = _compact(facts)
            else:
                self.facts[raw] = None
        self.progress.manifests += len(chunk)

    async def _read_manifests(self, roots: Iterable[bytes]) -> None:
        """Children and subjects not read with the roots, level by level."""
        pending = sorted(d for d in set(roots) if d not in self.facts)
        await in_parallel(chunked(pending), self._read_chunk, self.workers)
        pending = sorted(set(roots))
        while pending:
            following: set[bytes] = set()
            for raw in pending:
                facts = self.facts[raw]
                # most manifests name neither (images, not lists or referrers)
                if facts is not None and (facts.children or facts.subjects):
                    following.update(_digests(facts.children))
                    following.update(_digests(facts.subjects))
            pending = sorted(d for d in following if d not in self.facts)
            await in_parallel(chunked(pending), self._read_chunk, self.workers)
        self.result.manifests = sum(1 for f in self.facts.values() if f is not None)

    # -- blobs ------------------------------------------------------------------------------

    async def _presence(self) -> None:
        """Every referenced blob has data, of the size each descriptor gives: one call per
        blob shard, the stats and comparisons where the driver reads (a reader process)."""
        prior = self.prior
        trusted = prior is not None and self.storage.listing_proves_data
        manifest = self.facts.get
        exceptions = self.exceptions
        # per shard, (digest, wanted size) records as the manifests give them; the driver
        # sorts them and asks each blob once, however many images share it
        wants = [bytearray() for _ in range(256)]
        pack = SIZE_WANT.pack
        for facts in self.facts.values():
            if facts is None:
                continue
            blobs = facts.blobs
            sized = _wanted(facts)
            loose = [text for text in facts.loose if text.startswith("sha256:")]
            digests = [blobs[i : i + 32] for i in range(0, len(blobs), 32)]
            digests += [layout.parse_digest(text) for text in loose]
            for index, raw in enumerate(digests):
                known = manifest(raw)
                if known is not None:
                    exceptions[raw] = known.length  # read as a manifest: its size is known
                # the sweep listed this in-use digest's whole shard: it has data
                elif trusted and prior and raw[0] in prior.complete and raw in prior.in_use:
                    continue
                else:
                    # a descriptor's size, none (loose strings), or -1 (no file is that
                    # long: its size comes back and the judging compares it)
                    want = sized[index] if index < len(sized) else packed.NO_SIZE
                    wants[raw[0]] += pack(raw, want)
        asks = [shard for shard in range(256) if wants[shard]]
        self.progress.shards_total = len(asks)
        self.progress.shards_done = 0

        async def ask(shard: int) -> None:
            records, wants[shard] = bytes(wants[shard]), bytearray()
            for raw, size in await self.storage.blob_mismatches(f"{shard:02x}", records):
                exceptions[raw] = size
            self.progress.blobs_scanned += len(records) // SIZE_WANT.size
            self.progress.shards_done += 1

        await in_parallel(asks, ask, self.workers)

    def _has_data(self, raw: bytes) -> bool:
        """Whether a blob _presence was given has data (an exception says where not)."""
        return self.exceptions.get(raw, 0) is not None

    async def _named(self, roots: dict[str, set[bytes]]) -> dict[bytes, set[str]]:
        """Per manifest, the loose digest strings that name a blob or link of this store."""
        # the repositories holding each root, only for the few manifests that need them
        needing = {raw for raw, f in self.facts.items() if f is not None and (f.loose or f.foreign)}
        holders: dict[bytes, list[str]] = {}
        if needing:
            for repo, digests in roots.items():
                for raw in needing & digests:
                    holders.setdefault(raw, []).append(repo)
        deleted = self.prior.deleted if self.prior is not None else set()
        named: dict[bytes, set[str]] = {}
        asks: list[tuple[bytes, str, str]] = []  # (manifest, digest string, key to stat)
        foreign: list[tuple[str, str]] = []  # (sha384/sha512 digest string, link to read)
        for raw, facts in self.facts.items():
            if facts is None:
                continue
            for text in facts.loose:
                if text.startswith("sha256:"):
                    blob = layout.parse_digest(text)
                    if self._has_data(blob) or blob in deleted:
                        named.setdefault(raw, set()).add(text)
                        continue
                for key in loose_keys(holders.get(raw, ()), text):
                    asks.append((raw, text, key))
            # digests of other algorithms the typed parse named: the registry serves them
            # through a link in the repository (the blob itself lies under its sha256)
            for text in facts.foreign:
                for repo in holders.get(raw, ()):
                    foreign.append((text, layout.foreign_layer_link_dir(repo, text) + "link"))
                    foreign.append((text, layout.foreign_revision_dir(repo, text) + "link"))
        await self._foreign_present(foreign)
        for start in range(0, len(asks), 256):
            part = asks[start : start + 256]
            stats = await self.storage.stat_many([key for _r, _t, key in part])
            for (raw, text, _key), stat in zip(part, stats, strict=True):
                if stat is None:
                    continue
                if raw:
                    named.setdefault(raw, set()).add(text)
                else:
                    self.foreign_present.add(text)
        return named

    async def _foreign_present(self, links: list[tuple[str, str]]) -> None:
        """Each sha384/sha512 digest whose link names a blob with data is present."""
        for start in range(0, len(links), 256):
            part = links[start : start + 256]
            named = await self.storage.read_parsed([k for _t, k in part], 1024, layout.link_digest)
            found = [
                (t, raw) for (t, _k), raw in zip(part, named, strict=True) if isinstance(raw, bytes)
            ]
            stats = await self.storage.stat_many([layout.blob_data(raw.hex()) for _t, raw in found])
            for (text, _raw), stat in zip(found, stats, strict=True):
                if stat is not None:
                    self.foreign_present.add(text)

    # -- judging ----------------------------------------------------------------------------

    def _judge(self, roots: dict[str, set[bytes]], named: dict[bytes, set[str]]) -> None:
        problems: dict[bytes, list[tuple[str, str]]] = {}
        deleted = self.prior.deleted if self.prior is not None else set()
        exceptions = self.exceptions

        def judge(raw: bytes, visiting: frozenset[bytes]) -> list[tuple[str, str]]:
            if raw in problems:
                return problems[raw]
            facts = self.facts.get(raw)
            found: list[tuple[str, str]] = []
            if facts is None:
                digest = layout.format_digest(raw)
                found.append((digest, f'image "{digest}": unknown blob'))
                problems[raw] = found
                return found
            if facts.error:
                found.append(("", f"manifest cannot be parsed: {facts.error}"))
            blobs = _digests(facts.blobs)
            wants = facts.sizes or (None,) * (len(blobs) + len(facts.children) // 32)
            # most images name no exception: one lookup a blob, no size read
            if exceptions and any(blob in exceptions for blob in blobs):
                for blob, want in zip(blobs, wants, strict=False):
                    if blob not in exceptions:
                        continue  # has data, of every size a descriptor gives
                    size = exceptions[blob]
                    if size is None:
                        text = layout.format_digest(blob)
                        found.append((text, f'image blob "{text}": unknown blob'))
                    elif want is not None and size != want:
                        text = layout.format_digest(blob)
                        found.append(
                            (
                                "",
                                f'image blob "{text}": {size} bytes where the manifest says {want}',
                            )
                        )
            for text in facts.foreign:
                if text not in self.foreign_present:
                    found.append((text, f'image blob "{text}": unknown blob'))
            for child, want in zip(_digests(facts.children), wants[len(blobs) :], strict=True):
                text = layout.format_digest(child)
                kid = self.facts.get(child)
                if kid is None:
                    found.append((text, f'child manifest "{text}": unknown blob'))
                    continue
                if want is not None and want != kid.length:
                    found.append(
                        (
                            "",
                            f'child manifest "{text}": {kid.length} bytes '
                            f"where the list says {want}",
                        )
                    )
                if child not in visiting and judge(child, visiting | {raw}):
                    found.append(("", f'child manifest "{text}": broken'))
            for subject in _digests(facts.subjects):
                if self.facts.get(subject) is None:
                    text = layout.format_digest(subject)
                    found.append((text, f'subject "{text}": unknown blob'))
            for text in facts.loose:
                if text in named.get(raw, ()):
                    gone = text.startswith("sha256:") and layout.parse_digest(text) in deleted
                    found.append(
                        (
                            text if gone else "",
                            f'unparsed reference "{text}": names a blob or link of this store '
                            "that the manifest parser did not read"
                            + (" (deleted by this run)" if gone else ""),
                        )
                    )
            # a whole image (most are) shares one empty list: one per manifest was ~100 B each
            problems[raw] = found or whole
            return found

        whole: list[tuple[str, str]] = []
        result = self.result
        for facts_raw, facts in self.facts.items():
            if facts is not None:
                hits = named.get(facts_raw, set())
                result.unparsed += len(hits)
                result.foreign += len(facts.loose) - len(hits)
                result.annotations += facts.noted
        unlinked: dict[tuple[str, bytes], list[str]] = {}
        for repo, tag, raw in sorted(self._unlinked):
            unlinked.setdefault((repo, raw), []).append(tag)
        for repo in sorted(roots):
            for raw in sorted(roots[repo]):
                result.images += 1
                found = list(judge(raw, frozenset()))
                for tag in unlinked.get((repo, raw), ()):
                    found.append(("", f'tag "{tag}": the manifest has no revision link'))
                if not found:
                    continue
                digest = layout.format_digest(raw)
                result.broken += 1
                if len(result.examples) < EXAMPLES:
                    result.examples.append(f"{repo}@{digest}")
                self.report(
                    Finding(
                        "broken",
                        repo,
                        digest,
                        "; ".join(text for _m, text in found),
                        "\n".join(
                            f'Broken image "{digest}": {text} (repository "{repo}")'
                            for _m, text in found
                        ),
                        missing=sorted({m for m, _t in found if m}),
                    )
                )


def chunked(items: Sequence[T], size: int = CHUNK) -> list[list[T]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
