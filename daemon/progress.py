"""Counters a run exposes while it works."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class Progress:
    phase: str = "starting"
    repositories: int = 0
    manifests: int = 0
    manifests_total: int = 0  # revisions the mark phase reads (known once the scan is done)
    blobs_scanned: int = 0
    shards_done: int = 0
    shards_total: int = 256
    candidates: int = 0
    candidate_bytes: int = 0
    too_young: int = 0
    deleted: int = 0
    deleted_bytes: int = 0
    errors: int = 0
    phase_started: float = field(default_factory=time.monotonic)

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.phase_started = time.monotonic()

    def snapshot(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("phase_started")
        return data
