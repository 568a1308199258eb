"""What the repositories/ tree holds: one walk of the store, grouped per repository."""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon import layout


@dataclass(slots=True)
class Repository:
    name: str
    revisions: set[str] = field(default_factory=set)  # hex of revisions whose link exists
    tags: set[str] = field(default_factory=set)
    layers: set[str] = field(default_factory=set)  # hex of _layers links
    uploads: set[str] = field(default_factory=set)  # upload uuids
    uploads_started: set[str] = field(default_factory=set)  # uuids that have a startedat file


@dataclass(slots=True)
class Inventory:
    repositories: dict[str, Repository] = field(default_factory=dict)
    #: keys under repositories/ that the scheme does not name (reported, never deleted)
    unknown: int = 0

    def repo(self, name: str) -> Repository:
        found = self.repositories.get(name)
        if found is None:
            found = self.repositories[name] = Repository(name)
        return found

    def add_key(self, key: str) -> None:
        kind = layout.classify_repo_key(key)
        if kind is None:
            self.unknown += 1
            return
        repo = self.repo(kind.repository)
        match kind.kind:
            case "revision":
                repo.revisions.add(kind.digest_hex)
            case "layer":
                repo.layers.add(kind.digest_hex)
            case "tag_current" | "tag_index":
                repo.tags.add(kind.tag)
            case "upload_startedat":
                repo.uploads.add(kind.upload)
                repo.uploads_started.add(kind.upload)
            case "upload_other":
                repo.uploads.add(kind.upload)
