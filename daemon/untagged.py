"""Untagged manifests and tag retention (storage source): what a run keeps, what it removes.

Kept: every revision a kept tag's ``current/link`` names, and everything reachable from a kept
manifest: index/list children, and referrers whose ``subject`` is kept, recursively. Other
revisions are untagged; a delete removes their tag history entries, then their revision
links. Their blobs are left to the mark and sweep (a kept manifest anywhere keeps them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import structlog

from daemon import layout, manifests
from daemon.inventory import Inventory
from daemon.retention import Retention
from daemon.sources.base import SourceError
from daemon.storage.base import DeleteFailure, Storage, StorageError
from daemon.workers import each

UNTAGGED, RETENTION, ORPHAN_REFERRER = "untagged", "retention", "orphan-referrer"
MANIFEST_LIMIT = 4 * 1024 * 1024
CHUNK = 256
_MISSING = object()  # a revision whose manifest blob is gone: nothing says what it reaches


@dataclass(frozen=True, slots=True)
class Removal:
    """A revision an untagged or retention run removes (or would)."""

    repository: str
    hex: str
    tags: tuple[str, ...]  # the dropped tags that named it
    reason: str  # untagged | retention | orphan-referrer

    def document(self) -> dict[str, object]:
        return {
            "repository": self.repository,
            "digest": f"sha256:{self.hex}",
            "tags": list(self.tags),
            "reason": self.reason,
        }


@dataclass(slots=True)
class Plan:
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (repository, tag)
    removals: list[Removal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: what the plan already read of the tagged revisions, for the mark: storage key ->
    #: parsed link (raw digest) or packed references (manifests.packed_references)
    primed: dict[str, object] = field(default_factory=dict)

    def storage_for_mark(self, storage: Storage) -> Storage:
        """``storage``, answering the mark's reads the plan already made from memory (on
        object stores each is a request: the tagged revisions would be read twice)."""
        return _Primed(storage, self.primed)  # type: ignore[return-value]


class _Primed:
    """A Storage whose link and manifest reads answer from a plan's readings first."""

    def __init__(self, storage: Storage, primed: dict[str, object]) -> None:
        self._storage = storage
        self._primed = primed

    def __getattr__(self, name: str) -> object:
        return getattr(self._storage, name)

    async def read_parsed(
        self, keys: Sequence[str], limit: int, parse: Callable[[bytes], object]
    ) -> list[object]:
        known = parse is layout.link_digest or parse is manifests.packed_references
        out: list[object] = [None] * len(keys)
        fetch: list[int] = []
        for i, key in enumerate(keys):
            found = self._primed.pop(key, None) if known else None
            if found is None:
                fetch.append(i)
            else:
                out[i] = found
        if fetch:
            read = await self._storage.read_parsed([keys[i] for i in fetch], limit, parse)
            for i, value in zip(fetch, read, strict=True):
                out[i] = value
        return out


@dataclass(frozen=True, slots=True)
class _Node:
    children: bytes  # raw sha256 digests, concatenated
    foreign_children: bool
    subject: bytes | None  # raw sha256 of the subject
    foreign_subject: bool


def _chunks(items: Sequence[tuple[str, str]], size: int = CHUNK) -> Iterator[list[tuple[str, str]]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class Planner:
    """Reads tags and manifests once, decides what is kept and what goes."""

    def __init__(
        self,
        storage: Storage,
        retention: Retention,
        now: float,
        log: structlog.typing.FilteringBoundLogger,
        concurrency: int = 16,
    ) -> None:
        self.storage = storage
        self.retention = retention
        self.now = now
        self.log = log
        self.concurrency = max(1, concurrency)

    async def _tags(self, inventory: Inventory) -> dict[tuple[str, str], bytes]:
        """(repository, tag) -> the raw digest its current/link names (a tag without one
        names nothing, as distribution reads it); a corrupt link fails the run."""
        pairs = [(r.name, t) for r in inventory.repositories.values() for t in sorted(r.tags)]
        found: dict[tuple[str, str], bytes] = {}

        async def read(chunk: list[tuple[str, str]]) -> None:
            keys = [_tag_link(repo, tag) for repo, tag in chunk]
            try:
                named = await self.storage.read_parsed(keys, 1024, layout.link_digest)
            except StorageError as exc:
                raise SourceError(f"cannot read tag links: {exc}; nothing was deleted") from exc
            for pair, key, raw in zip(chunk, keys, named, strict=True):
                if isinstance(raw, ValueError):
                    raise SourceError(
                        f"tag link {self.storage.location(key)} is corrupt ({raw}); nothing was "
                        "deleted. Push the tag again (or remove its directory), then run again"
                    )
                if raw is not None:
                    found[pair] = raw

        await each(_chunks(pairs), read, self.concurrency)
        return found

    async def _pushed(self, tags: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """Push time of each tag: its current/link's modification time."""
        times: dict[tuple[str, str], float] = {}

        async def stat(chunk: list[tuple[str, str]]) -> None:
            keys = [_tag_link(repo, tag) for repo, tag in chunk]
            try:
                entries = await self.storage.stat_many(keys)
            except StorageError as exc:
                raise SourceError(
                    f"cannot read tag push times: {exc}; nothing was deleted"
                ) from exc
            for pair, key, entry in zip(chunk, keys, entries, strict=True):
                if entry is None or entry.mtime is None:
                    raise SourceError(
                        f"tag link {self.storage.location(key)} has no modification time (gone "
                        "since it was read?); nothing was deleted. Run again"
                    )
                times[pair] = entry.mtime

        await each(_chunks(tags), stat, self.concurrency)
        return times

    async def _nodes(
        self, inventory: Inventory, tagged: set[tuple[str, bytes]], primed: dict[str, object]
    ) -> dict[str, dict[bytes, object]]:
        """repository -> raw digest -> _Node, or _MISSING where the manifest blob is gone;
        revisions whose link is gone are left out (distribution does not see them). The
        readings of ``tagged`` revisions go to ``primed`` for the mark."""
        pairs = [(r.name, h) for r in inventory.repositories.values() for h in sorted(r.revisions)]
        nodes: dict[str, dict[bytes, object]] = {}

        async def read(chunk: list[tuple[str, str]]) -> None:
            links = [layout.revision_dir(repo, h) + "link" for repo, h in chunk]
            try:
                named = await self.storage.read_parsed(links, 1024, layout.link_digest)
            except StorageError as exc:
                raise SourceError(f"cannot read manifest links: {exc}") from exc
            todo: list[tuple[str, str]] = []
            for (repo, h), link, raw in zip(chunk, links, named, strict=True):
                if isinstance(raw, ValueError):
                    raise SourceError(
                        f"manifest link {self.storage.location(link)} is corrupt: {raw}"
                    )
                if raw is not None and raw.hex() == h:
                    todo.append((repo, h))
                    if (repo, raw) in tagged:
                        primed[link] = raw
            keys = [layout.blob_data(h) for _repo, h in todo]
            try:
                parsed = await self.storage.read_parsed(
                    keys, MANIFEST_LIMIT, manifests.graph_references
                )
            except StorageError as exc:
                raise SourceError(f"cannot read manifests: {exc}") from exc
            for (repo, h), refs in zip(todo, parsed, strict=True):
                raw = bytes.fromhex(h)
                mine = nodes.setdefault(repo, {})
                if refs is None:
                    mine[raw] = _MISSING
                    continue
                if isinstance(refs, ValueError):
                    raise SourceError(f"manifest sha256:{h} of {repo} cannot be parsed: {refs}")
                packed, subject = refs
                if (repo, raw) in tagged:
                    primed[layout.blob_data(h)] = packed
                mine[raw] = _Node(packed[1], bool(packed[3]), *_subject(subject))

        await each(_chunks(pairs), read, self.concurrency)
        return nodes

    async def plan(self, inventory: Inventory) -> Plan:
        """What goes: dropped tags, then untagged revisions; fails closed on any doubt."""
        plan = Plan()
        targets = await self._tags(inventory)
        dropped: set[tuple[str, str]] = set()
        scoped = [pair for pair in targets if self.retention.applies_to(pair[0])]
        if scoped:
            pushed = await self._pushed(scoped)
            per_repo: dict[str, dict[str, float]] = {}
            for (repo, tag), when in pushed.items():
                per_repo.setdefault(repo, {})[tag] = when
            for repo, times in sorted(per_repo.items()):
                dropped |= {(repo, tag) for tag in self.retention.dropped(repo, times, self.now)}
        plan.dropped = sorted(dropped)
        tagged = {(repo, raw) for (repo, tag), raw in targets.items() if (repo, tag) not in dropped}
        nodes = await self._nodes(inventory, tagged, plan.primed)
        tagged: dict[str, list[tuple[str, bytes]]] = {}
        for (repo, tag), raw in targets.items():
            tagged.setdefault(repo, []).append((tag, raw))
        for name in sorted(inventory.repositories):
            plan.removals += self._repository(
                name, tagged.get(name, []), dropped, nodes.get(name, {}), plan.notes
            )
        return plan

    def _repository(
        self,
        name: str,
        targets: list[tuple[str, bytes]],
        dropped: set[tuple[str, str]],
        mine: dict[bytes, object],
        notes: list[str],
    ) -> list[Removal]:
        """One repository's untagged revisions (a repository is its own keep graph)."""
        referrers: dict[bytes, list[bytes]] = {}
        for raw, node in mine.items():
            if isinstance(node, _Node) and node.subject is not None:
                referrers.setdefault(node.subject, []).append(raw)
        queue = [raw for tag, raw in targets if (name, tag) not in dropped]
        kept: set[bytes] = set()
        while queue:
            raw = queue.pop()
            if raw in kept:
                continue
            kept.add(raw)
            node = mine.get(raw)
            if node is _MISSING or (isinstance(node, _Node) and node.foreign_children):
                # what it reaches cannot be known here: nothing of this repository goes
                notes.append(
                    f"{name}: kept manifest sha256:{raw.hex()} "
                    + ("has no blob" if node is _MISSING else "names sha384/sha512 children")
                    + "; its untagged revisions are all kept"
                )
                return []
            if isinstance(node, _Node):
                view = node.children
                queue += [view[i : i + 32] for i in range(0, len(view), 32)]
            queue += referrers.get(raw, ())
        dropped_by: dict[bytes, list[str]] = {}
        for tag, raw in targets:
            if (name, tag) in dropped:
                dropped_by.setdefault(raw, []).append(tag)
        out: list[Removal] = []
        for raw, node in sorted(mine.items()):
            if raw in kept:
                continue
            if node is _MISSING:
                # nothing says what it is (a referrer, an index): left as distribution does
                notes.append(f"{name}: revision sha256:{raw.hex()} has no blob; kept")
                continue
            assert isinstance(node, _Node)
            if node.foreign_subject:
                notes.append(
                    f"{name}: revision sha256:{raw.hex()} names a sha384/sha512 subject; kept"
                )
                continue
            tags = tuple(sorted(dropped_by.get(raw, ())))
            if node.subject is not None:
                reason = ORPHAN_REFERRER
            elif tags:
                reason = RETENTION
            else:
                reason = UNTAGGED
            out.append(Removal(name, raw.hex(), tags, reason))
        return out


def _subject(text: str | None) -> tuple[bytes | None, bool]:
    if text is None:
        return None, False
    try:
        return layout.parse_digest(text), False
    except layout.InvalidDigest:
        return None, True  # sha384/sha512 (parse already refused anything else)


def _tag_link(repo: str, tag: str) -> str:
    return f"{layout.repository_root(repo)}_manifests/tags/{tag}/current/link"


def tag_dir(repo: str, tag: str) -> str:
    return f"{layout.repository_root(repo)}_manifests/tags/{tag}/"


class Remover:
    """Applies a plan through the engine's Pruner: dropped tags, the history entries of the
    revisions that go, then their revision links (each step safe to repeat after a crash)."""

    def __init__(
        self,
        storage: Storage,
        pruner: object,
        deleting: bool,
        log: structlog.typing.FilteringBoundLogger,
        count_failures: Callable[[list[DeleteFailure]], None],
        on_manifest: Callable[[Removal], None],
    ) -> None:
        self.storage = storage
        self.pruner = pruner
        self.deleting = deleting
        self.verb = "Deleted" if deleting else "Would delete"
        self.log = log
        self.count_failures = count_failures
        self.on_manifest = on_manifest
        self.failed = 0  # removals that did not happen (failed, or refused through a link)

    def _failures(self, failures: list[DeleteFailure]) -> None:
        self.failed += len(failures)
        self.count_failures(failures)

    async def apply(self, plan: Plan) -> tuple[int, int]:
        """Remove what ``plan`` names; (tags, manifests) removed (or that would be)."""
        tags_done = 0
        failed_tags: set[tuple[str, str]] = set()
        for start in range(0, len(plan.dropped), 1000):
            part = plan.dropped[start : start + 1000]
            prefixes = [tag_dir(repo, tag) for repo, tag in part]
            failures = await self.pruner.remove_tags(self.storage, prefixes)  # type: ignore[attr-defined]
            self._failures(failures)
            failed = {f.key for f in failures}
            for (repo, tag), prefix in zip(part, prefixes, strict=True):
                if prefix in failed:
                    failed_tags.add((repo, tag))
                    continue
                tags_done += 1
                self.log.info(f"{self.verb} tag: {repo}:{tag}")
        # a revision whose dropped tag is still there stays: no tag may dangle
        removals = [
            r
            for r in plan.removals
            if not any((r.repository, tag) in failed_tags for tag in r.tags)
        ]
        if self.deleting and removals:
            await self._remove_history(removals, {p for p in plan.dropped})
        done = 0
        for start in range(0, len(removals), 1000):
            part = removals[start : start + 1000]
            prefixes = [layout.revision_dir(r.repository, r.hex) for r in part]
            failures = await self.pruner.remove(self.storage, prefixes)  # type: ignore[attr-defined]
            self._failures(failures)
            failed = {f.key for f in failures}
            for removal, prefix in zip(part, prefixes, strict=True):
                if prefix in failed:
                    continue
                done += 1
                self.on_manifest(removal)
                self.log.info(f"{self.verb} manifest: {removal.repository}@sha256:{removal.hex}")
        return tags_done, done

    async def _remove_history(self, removals: list[Removal], dropped: set[tuple[str, str]]) -> None:
        """Every ``_manifests/tags/*/index/sha256/<hex>`` entry naming a revision that goes
        (the dropped tags' own went with their directories)."""
        going: dict[str, set[str]] = {}
        for removal in removals:
            going.setdefault(removal.repository, set()).add(removal.hex)
        prefixes: list[str] = []
        for repo, hexes in sorted(going.items()):
            base = f"{layout.repository_root(repo)}_manifests/tags/"
            try:
                async for batch in self.storage.walk(base):
                    for entry in batch:
                        parts = entry.key[len(base) :].split("/")
                        if (
                            len(parts) == 5
                            and parts[1:3] == ["index", "sha256"]
                            and parts[4] == "link"
                            and parts[3] in hexes
                            and (repo, parts[0]) not in dropped
                        ):
                            prefixes.append(f"{base}{parts[0]}/index/sha256/{parts[3]}/")
            except StorageError as exc:
                raise SourceError(f"cannot list the tags of {repo}: {exc}") from exc
        for start in range(0, len(prefixes), 1000):
            failures = await self.pruner.remove_tags(  # type: ignore[attr-defined]
                self.storage, prefixes[start : start + 1000]
            )
            self._failures(failures)
