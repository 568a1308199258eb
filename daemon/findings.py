"""What verify and recover found: broken images and lost manifests, and their counts.

Light on purpose: the API reads these without loading the engine or the OpenShift client.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class Finding:
    """One broken image (verify) or one lost manifest (recover), in the original words."""

    kind: str  # broken | lost-found
    repository: str
    digest: str
    reason: str
    message: str  # the line(s) the original binary prints
    missing: list[str] = field(default_factory=list)
    tag: str = ""  # recover: the lost-found tag

    def document(self) -> dict[str, object]:
        if self.kind == "broken":
            return {
                "repository": self.repository,
                "digest": self.digest,
                "missing": self.missing,
                "reason": self.reason,
                "message": self.message,
            }
        return {
            "repository": self.repository,
            "digest": self.digest,
            "tag": self.tag,
            "reason": self.reason,
            "message": self.message,
        }


@dataclass(slots=True)
class Verification:
    """What a verification counted; ``broken`` 0 means every kept image is whole."""

    images: int = 0  # (repository, manifest) pairs, or Image objects, checked
    broken: int = 0
    manifests: int = 0  # distinct manifests read
    tags: int = 0  # tag links (storage) or image stream tag items (openshift) checked
    unparsed: int = 0  # digests the typed parse missed that name something of this store
    foreign: int = 0  # digest strings that name nothing of this store
    annotations: int = 0  # digest strings in annotations or history: not checked
    after_delete: bool = False
    examples: list[str] = field(default_factory=list)  # the first broken digests

    @property
    def passed(self) -> bool:
        return self.broken == 0

    def document(self) -> dict[str, object]:
        return {**asdict(self), "passed": self.passed}

    def lines(self) -> list[str]:
        """The summary, after the ``Broken ...`` lines."""
        if self.after_delete:
            verdict = "passed" if self.passed else "FAILED"
            return [
                f"Verification {verdict}: checked {self.images} kept images: {self.broken} broken"
            ]
        return [f"Checked {self.images} images: {self.broken} broken"]


@dataclass(slots=True)
class Recovered:
    """What a recover run found and did."""

    lost: int = 0  # manifests no Image object of their stream accounts for
    added: int = 0  # ImageStreamMappings created (apply=true)
    failed: int = 0
    skipped: int = 0  # unreadable manifests, repositories that cannot be image streams
    applied: bool = False

    def document(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> Recovered:
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})

    def lines(self) -> list[str]:
        if not self.applied:
            lines = [f"Would add {self.lost} images to their image streams under lost-found tags"]
            if self.lost:
                lines.append("Use apply=true to actually add them")
            return lines
        lines = [f"Added {self.added} images to their image streams under lost-found tags"]
        if self.failed:
            lines.append(f"Could not add {self.failed} images (see the log)")
        return lines
