"""Verify: is every kept image whole? (OpenShift's ``-restore-mode=check``, and the proof
that follows every delete run.)

The storage reading: every linked revision and every tag's current manifest, its blobs
(present, sizes as the descriptors say), its children recursively and a referrer's subject;
beside the typed parse, every digest-shaped string of the manifest (daemon.verifying).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog

from daemon import layout, manifests, packed
from daemon.findings import Finding, Verification
from daemon.inventory import DigestSet, Inventory
from daemon.progress import Progress
from daemon.storage.base import Storage
from daemon.verify_held import HeldFacts, Presence, Roots
from daemon.verifying import SIZE_WANT, Chunk, Facts, TypedParse, fold_facts, read_facts
from daemon.workers import each, in_parallel

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
    deleted: AbstractSet[bytes] | packed.SpilledDigests
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
        spill: bool = False,
        spill_dir: Path | None = None,
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
        # the manifests read, held packed (issue 19): a delete's in-use set, which holds every
        # manifest it read, is the index of their lengths (4 bytes a digest, no copy of it)
        base = [prior.in_use.shard(s).data for s in range(256)] if prior is not None else []
        self.held = HeldFacts(base)
        #: (digest, wanted size) records of every referenced blob, by blob shard, as the
        #: readers folded them; a delete's in a file of the state dir (``spill``, issue 19)
        self.wanted = packed.ShardRecords(SIZE_WANT.size, spill=spill, directory=spill_dir)
        self.present = Presence(self.held)  # referenced blobs that are missing or mis-sized
        self.foreign_present: set[str] = set()  # sha512/sha384 blobs with data

    async def run(self, inventory: Inventory) -> Verification:
        self.progress.enter(self.name)
        try:
            roots = await self._roots(inventory)
            await self._read_manifests()
            await self._presence()
        finally:
            self.wanted.close()
        if self.present.bad:
            await self._read_again()
        named = await self._named(roots)
        self._judge(roots, named)
        self.log.info("verified", **self.result.document())
        return self.result

    # -- roots ------------------------------------------------------------------------------

    async def _roots(self, inventory: Inventory) -> Roots:
        """Per repository: its linked revisions and its tags' current manifests."""
        prior = self.prior

        def removed(repo: str, hexdigest: str) -> bool:
            return prior is not None and (
                repo in prior.removed_repositories or (repo, hexdigest) in prior.removed_revisions
            )

        roots = Roots(inventory, removed)

        def revisions() -> Iterator[tuple[str, str]]:
            # made as the workers take them: a list of every revision was ~180 B each
            for repo in inventory.repositories.values():
                yield from ((repo.name, h) for h in repo.revisions if not removed(repo.name, h))

        def tags() -> Iterator[tuple[str, str]]:
            if prior is not None and not prior.tags:
                return
            for repo in inventory.repositories.values():
                if prior is None or repo.name not in prior.removed_repositories:
                    yield from ((repo.name, tag) for tag in repo.tags)

        async def read_revisions(chunk: list[tuple[str, str]]) -> list[bytes]:
            keys = [layout.revision_dir(r, h) + "link" for r, h in chunk]
            found = await self.storage.read_parsed(keys, 1024, layout.link_digest)
            accepted: list[bytes] = []
            for (repo, hexdigest), raw in zip(chunk, found, strict=True):
                if raw is None or isinstance(raw, ValueError) or raw.hex() != hexdigest:
                    roots.dropped.add((repo, bytes.fromhex(hexdigest)))
                if raw is None:
                    continue  # the scan named a directory whose link is gone: no revision
                if isinstance(raw, ValueError) or raw.hex() != hexdigest:
                    self._broken_link(repo, f"revision link of sha256:{hexdigest}", raw)
                    continue
                accepted.append(raw)
            return accepted

        self._unlinked: set[tuple[str, str, bytes]] = set()

        async def read_tags(chunk: list[tuple[str, str]]) -> list[bytes]:
            keys = [tag_link(r, t) for r, t in chunk]
            found = await self.storage.read_parsed(keys, 1024, layout.link_digest)
            linked = roots.revisions_of({repo for repo, _tag in chunk})
            for (repo, tag), raw in zip(chunk, found, strict=True):
                if raw is None:
                    continue  # a tag directory without current link: distribution lists no tag
                self.result.tags += 1
                if isinstance(raw, ValueError):
                    self._broken_link(repo, f"current link of tag {tag!r}", raw)
                    continue
                # every revision is read by now: a tag whose manifest has no revision link
                # cannot be pulled (distribution reads manifests through revision links)
                if raw not in linked[repo] or not roots.kept(repo, raw):
                    roots.add_tagged(repo, raw)
                    self._unlinked.add((repo, tag, raw))
            return [raw for raw in found if isinstance(raw, bytes)]

        async def links_then_manifests(step: Callable[[], Awaitable[list[bytes]]]) -> None:
            named = [raw for raw in await step() if raw not in self.held]
            self.held.claim(named)  # no other worker reads them
            await self._read_chunk(named)

        # links and the manifests they name in one pipeline, as the mark phase reads them:
        # each chunk's new manifests are read by the worker that read its links. Tags come
        # after every revision, in larger chunks: what they name is nearly always a revision
        # read by then, so a tag chunk is one small read per tag and no manifest
        steps = (functools.partial(read_revisions, c) for c in lazy_chunks(revisions(), CHUNK))
        await each(steps, links_then_manifests, self.workers)
        steps = (functools.partial(read_tags, c) for c in lazy_chunks(tags(), TAG_CHUNK))
        await each(steps, links_then_manifests, self.workers)
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
        found: Chunk = await self.storage.read_folded(keys, MANIFEST_LIMIT, self.read, fold_facts)
        for raw, facts in zip(chunk, found.facts, strict=True):
            self.held.store(raw, facts)
        for shard, records in found.wants:
            self.wanted.extend(shard, records)
        self.progress.manifests += len(chunk)

    async def _read_manifests(self) -> None:
        """Children and subjects not read with the roots (every root was), level by level."""
        level: Iterable[Facts | None] = list(self.held.rich.values())
        while True:
            following: set[bytes] = set()
            for facts in level:
                # most manifests name neither (images, not lists or referrers)
                if facts is not None and (facts.children or facts.subjects):
                    following.update(_digests(facts.children))
                    following.update(_digests(facts.subjects))
            pending = sorted(d for d in following if d not in self.held)
            if not pending:
                break
            self.held.claim(pending)
            await in_parallel(chunked(pending), self._read_chunk, self.workers)
            level = [self.held.rich.get(raw) for raw in pending]
        self.result.manifests = self.held.read()

    async def _read_again(self) -> None:
        """A referenced blob is missing or of another size: read the plain manifests again,
        keeping those naming such a blob, so that judging names their images."""
        bad = self.present.bad

        async def chunk(raws: list[bytes]) -> None:
            keys = [layout.blob_data(raw.hex()) for raw in raws]
            found = await self.storage.read_parsed(keys, MANIFEST_LIMIT, self.read)
            for raw, facts in zip(raws, found, strict=True):
                if not isinstance(facts, Facts):
                    self.held.keep_again(raw, None)  # gone since: its image is broken
                elif any(blob in bad for blob in _digests(facts.blobs)):
                    self.held.keep_again(raw, facts)

        await each(lazy_chunks(self.held.plain(), CHUNK), chunk, self.workers)

    # -- blobs ------------------------------------------------------------------------------

    async def _presence(self) -> None:
        """Whether each referenced blob has data of the size its descriptors want, judged a
        blob shard at a time: what the run knows, else one ask of the store per shard."""
        held, present = self.held, self.present
        held.loose.seal()
        prior = self.prior
        trusted = prior is not None and self.storage.listing_proves_data
        self.progress.shards_total = 256
        self.progress.shards_done = 0

        def known(shard: int, raw: bytes) -> int | None:
            length = held.lengths.get(raw)
            if length is not None and length >= 0:
                return length  # a manifest verify read: its length is its size
            # the sweep listed this in-use digest's whole shard: it has data
            if trusted and prior and shard in prior.complete and raw in prior.in_use:
                return packed.UNSIZED
            return None

        async def shard_of(shard: int) -> None:
            # the (digest, wanted size) records of the shard's referenced blobs, as the
            # readers folded them: the driver stats each blob once and compares every size
            # where it reads (a reader process), and only the missing and mis-sized come back
            asked = self.wanted.take(shard)
            if asked and trusted and prior and shard in prior.complete:
                asked = _outside(asked, prior.in_use.shard(shard).data)
            if asked:
                bad = await self.storage.blob_mismatches(f"{shard:02x}", asked)
                for raw, found in bad:
                    present.bad[raw] = packed.MISSING if found is None else found
                self.progress.blobs_scanned += len(asked) // SIZE_WANT.size
            loose: list[bytes] = []
            for raw in packed.records(held.loose.shard(shard)):
                size = known(shard, raw)
                if size is None:
                    loose.append(raw)
                else:
                    held.loose.set(raw, size)
            if loose:
                ask = packed.PackedShard(packed.sorted_unique(*loose))
                sizes = await self.storage.blob_sizes(f"{shard:02x}", ask)
                for raw in loose:
                    if raw in sizes:
                        held.loose.set(raw, sizes[raw])
            self.progress.shards_done += 1

        await in_parallel(range(256), shard_of, self.workers)

    async def _named(self, roots: Roots) -> dict[bytes, set[str]]:
        """Per manifest, the loose digest strings that name a blob or link of this store."""
        # the repositories holding each root, only for the few manifests that need them
        rich = self.held.rich
        needing = [raw for raw, f in rich.items() if f.loose or f.foreign]
        holders: dict[bytes, list[str]] = {}
        if needing:
            for repo in roots.names():
                for raw in needing:
                    if (repo, raw) in roots:
                        holders.setdefault(raw, []).append(repo)
        deleted: AbstractSet[bytes] | packed.SpilledDigests = (
            self.prior.deleted if self.prior is not None else frozenset()
        )
        named: dict[bytes, set[str]] = {}
        asks: list[tuple[bytes, str, str]] = []  # (manifest, digest string, key to stat)
        foreign: list[tuple[str, str]] = []  # (sha384/sha512 digest string, link to read)
        for raw, facts in rich.items():
            for text in facts.loose:
                if text.startswith("sha256:"):
                    blob = layout.parse_digest(text)
                    if blob in self.present or blob in deleted:
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

    def _judge(self, roots: Roots, named: dict[bytes, set[str]]) -> None:
        problems: dict[bytes, list[tuple[str, str]]] = {}
        deleted: AbstractSet[bytes] | packed.SpilledDigests = (
            self.prior.deleted if self.prior is not None else frozenset()
        )
        present = self.present

        def judge(raw: bytes, visiting: frozenset[bytes]) -> list[tuple[str, str]]:
            if raw in problems:
                return problems[raw]
            if self.held.judged(raw):
                return whole  # read, its blobs all as wanted (else it would be read again)
            facts = self.held.get(raw)
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
            for blob, want in zip(blobs, wants, strict=False):
                size = present.blob(blob)
                if size == packed.MISSING:
                    text = layout.format_digest(blob)
                    found.append((text, f'image blob "{text}": unknown blob'))
                    continue
                if size != packed.UNSIZED and want is not None and size != want:
                    text = layout.format_digest(blob)
                    found.append(
                        ("", f'image blob "{text}": {size} bytes where the manifest says {want}')
                    )
            for text in facts.foreign:
                if text not in self.foreign_present:
                    found.append((text, f'image blob "{text}": unknown blob'))
            for child, want in zip(_digests(facts.children), wants[len(blobs) :], strict=True):
                text = layout.format_digest(child)
                kid = self.held.get(child)
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
                if self.held.get(subject) is None:
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
            # kept for lists (their children) and broken ones: a whole image is judged again
            # in each repository holding it, where a list per manifest was ~100 B each
            if found or facts.children:
                problems[raw] = found or whole
            return found

        whole: list[tuple[str, str]] = []
        result = self.result
        for facts_raw, facts in self.held.rich.items():
            hits = named.get(facts_raw, set())
            result.unparsed += len(hits)
            result.foreign += len(facts.loose) - len(hits)
            result.annotations += facts.noted
        unlinked: dict[tuple[str, bytes], list[str]] = {}
        for repo, tag, raw in sorted(self._unlinked):
            unlinked.setdefault((repo, raw), []).append(tag)
        for repo in roots.names():
            for raw in roots.of(repo):
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


_WANT_DIGESTS = re.compile(rb"(.{32}).{8}", re.DOTALL)  # the digest of each SIZE_WANT record


def _outside(wants: bytes, base: bytes) -> bytes:
    """The ``SIZE_WANT`` records of ``wants`` whose digest is no record of ``base`` (sorted
    32-byte digests): sets in C, and a record at a time only where one is outside."""
    outside = set(_WANT_DIGESTS.findall(wants)).difference(packed.records(base))
    if not outside:
        return b""
    size = SIZE_WANT.size
    return b"".join(
        wants[at : at + size] for at in range(0, len(wants), size) if wants[at : at + 32] in outside
    )


def lazy_chunks(items: Iterator[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size``, each made when it is taken."""
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def chunked(items: Sequence[T], size: int = CHUNK) -> list[list[T]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
