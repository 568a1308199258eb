"""Tag retention: which tags of a repository a policy keeps (the rest are dropped).

A tag is kept if any rule keeps it; with no rule at all, every tag is kept.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any


class PolicyError(ValueError):
    """A retention option that cannot be used as given."""


@dataclass(frozen=True, slots=True)
class Retention:
    keep_last: int | None = None  # the N most recently pushed tags of each repository
    keep_younger_than: float | None = None  # seconds: tags pushed more recently than this
    keep_tags: str | None = None  # regular expression, full match: always kept
    repositories: str | None = None  # glob: the repositories the policy applies to

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 0:
            raise PolicyError(f"keep_last must be 0 or more, not {self.keep_last}")
        if self.keep_younger_than is not None and self.keep_younger_than < 0:
            raise PolicyError("keep_younger_than must not be negative")
        if self.keep_tags is not None:
            try:
                re.compile(self.keep_tags)
            except re.error as exc:
                raise PolicyError(f"keep_tags is not a regular expression: {exc}") from None
        if self.repositories is not None and not self.active:
            # a scope without a rule would keep no tag at all in it: never a guess
            raise PolicyError(
                "repositories only says where a retention rule applies: add keep_last, "
                "keep_younger_than or keep_tags"
            )

    @property
    def active(self) -> bool:
        """Whether any rule is set (without one no tag is ever dropped)."""
        return (
            self.keep_last is not None
            or self.keep_younger_than is not None
            or self.keep_tags is not None
        )

    def document(self) -> dict[str, object]:
        return {
            "keep_last": self.keep_last,
            "keep_younger_than_seconds": self.keep_younger_than,
            "keep_tags": self.keep_tags,
            "repositories": self.repositories,
        }

    def applies_to(self, repository: str) -> bool:
        if not self.active:
            return False
        return self.repositories is None or fnmatch.fnmatchcase(repository, self.repositories)

    def dropped(self, repository: str, pushed: dict[str, float], now: float) -> set[str]:
        """The tags of ``repository`` no rule keeps; ``pushed``: tag -> push time (epoch)."""
        if not self.applies_to(repository):
            return set()
        kept: set[str] = set()
        if self.keep_last:
            # newest first; equal times by name, so a run's answer does not depend on order
            newest = sorted(pushed, key=lambda tag: (-pushed[tag], tag))
            kept.update(newest[: self.keep_last])
        if self.keep_younger_than is not None:
            cutoff = now - self.keep_younger_than
            kept.update(tag for tag, when in pushed.items() if when > cutoff)
        if self.keep_tags is not None:
            pattern = re.compile(self.keep_tags)
            kept.update(tag for tag in pushed if pattern.fullmatch(tag))
        return set(pushed) - kept


#: the /prune query options of untagged and retention runs
REVISION_PARAMS = ("untagged", "keep_last", "keep_younger_than", "keep_tags", "repositories")


def revision_options(
    untagged: bool, given: dict[str, str], mode: str, source: str
) -> tuple[bool, Retention]:
    """The untagged flag and the retention policy of a run from its options as text
    (query or flags); PolicyError says what is wrong with them."""
    from daemon.config import parse_duration

    keep_last: int | None = None
    if given.get("keep_last") is not None:
        try:
            keep_last = int(given["keep_last"])
        except ValueError:
            raise PolicyError(
                f"keep_last must be a whole number, not {given['keep_last']!r}"
            ) from None
    younger: float | None = None
    if given.get("keep_younger_than") is not None:
        try:
            younger = parse_duration(given["keep_younger_than"])
        except ValueError as exc:
            raise PolicyError(f"keep_younger_than: {exc}") from None
    retention = Retention(keep_last, younger, given.get("keep_tags"), given.get("repositories"))
    if not (untagged or retention.active):
        return False, retention
    if source == "openshift":
        raise PolicyError(
            "untagged and retention runs are for the storage source: with the openshift "
            "source the cluster decides which images stay (run `oc adm prune images`, then "
            "a delete run removes their blobs)"
        )
    if mode not in ("check", "delete"):
        raise PolicyError("untagged and retention options are for mode=check and mode=delete")
    return untagged, retention


def add_revision_flags(parser: Any) -> None:
    """--untagged and the retention flags of check and delete."""
    parser.add_argument(
        "--untagged",
        action="store_true",
        help="also remove manifest revisions no kept tag reaches (storage source)",
    )
    parser.add_argument("--keep-last", metavar="N", help="retention: keep the N newest tags")
    parser.add_argument(
        "--keep-younger-than", metavar="DURATION", help="retention: keep tags pushed since (30d)"
    )
    parser.add_argument("--keep-tags", metavar="REGEX", help="retention: always keep these tags")
    parser.add_argument(
        "--repositories", metavar="GLOB", help="retention: the repositories it applies to"
    )
