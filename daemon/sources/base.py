"""The reference-source interface: given the store's inventory, say what is in use."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field

from daemon.inventory import DigestSet, Inventory
from daemon.progress import Progress
from daemon.storage.base import Storage
from daemon.usage import UsagePairs


class SourceError(Exception):
    """Building the in-use set failed: the run must fail closed."""


class ReadOnlyRefused(Exception):
    """A run refused before it starts (a delete while the registry is writable, online mode
    where it cannot be made safe): what is wrong, and what to do instead."""

    def __init__(self, error: str, hint: str = "") -> None:
        super().__init__(f"{error}; {hint}" if hint else error)
        self.error = error
        self.hint = hint


@dataclass(slots=True)
class Marks:
    """Outcome of the mark phase."""

    in_use: DigestSet = field(default_factory=DigestSet)  # 32-byte raw sha256 digests
    remove_repositories: list[str] = field(default_factory=list)
    remove_revisions: list[tuple[str, str]] = field(default_factory=list)  # (repository, hex)
    notes: list[str] = field(default_factory=list)  # what was skipped, and why
    #: which repositories reference which blobs, where the source was asked for usage
    usage: UsagePairs | None = None


class ReferenceSource(ABC):
    name: str = ""
    #: why online delete cannot be made safe with this source (empty when it can), and
    #: what to do instead
    online_refusal: str = ""
    online_hint: str = ""
    #: set by the engine before mark: record per-repository usage (sources that can)
    usage_wanted: bool = False

    @abstractmethod
    async def mark(self, inventory: Inventory, storage: Storage, progress: Progress) -> Marks:
        """Build the in-use set; raise SourceError on anything that makes it unreliable."""

    async def registry_read_only(self) -> bool | None:
        """True/False where this source knows the registry's read-only state, else None."""
        return None

    async def start_online(self) -> None:  # noqa: B027 - optional hook
        """Begin watching for references created during the run (online delete)."""

    async def newly_in_use(self, candidates: Iterable[bytes]) -> set[bytes]:
        """Those ``candidates`` referenced since mark; raise SourceError when unsure."""
        return set()

    async def repositories_now_in_use(self, names: Iterable[str]) -> set[str]:
        """Online mode: those of ``names`` (marked for removal) that the source references now;
        raise SourceError when unsure."""
        return set()

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and watches."""
