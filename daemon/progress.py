"""Counters a run exposes while it works."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

#: the share of a run's time each phase takes (bench/README.md, "ETA"): a check with usage
#: at 500k blobs on a filesystem spent ~5% scanning, ~45% marking, ~48% sweeping; on S3 the
#: scan weighs more (26 s of 113 s without usage). A delete adds its own phase and the
#: verify that proves it (at 50k blobs: delete 15-50%, verify 25-55% of the run).
CHECK_WEIGHTS = (("scan-repositories", 0.1), ("mark", 0.45), ("sweep", 0.45))
DELETE_WEIGHTS = (
    ("scan-repositories", 0.1),
    ("mark", 0.15),
    ("sweep", 0.1),
    ("delete", 0.3),
    ("verify", 0.35),
)
#: phases whose own pace says how long the later ones take: they read the store as those do.
#: A delete's pace follows its candidates and says nothing about the verify after it.
_OWN_PACE = ("mark", "sweep")
_MIN_FRACTION = 0.03  # below it an ETA is mostly noise
_MIN_WITHIN = 0.05  # how far into a phase before its own pace is trusted


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
    #: repositories the last run found: how far the scan is, which has no total of its own
    repositories_expected: int = 0
    phase_started: float = field(default_factory=time.monotonic)

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.phase_started = time.monotonic()

    def _within(self, phase: str) -> float:
        """How far the current phase is, 0..1, from its own counters."""
        if phase == "scan-repositories":
            expected = self.repositories_expected
            return min(0.95, self.repositories / expected) if expected else 0.0
        if phase == "mark":
            total = self.manifests_total
            return min(1.0, self.manifests / total) if total else 0.0
        if phase == "sweep":
            return self.shards_done / self.shards_total if self.shards_total else 0.0
        if phase == "delete":
            done = self.deleted + self.errors
            return min(1.0, done / self.candidates) if self.candidates else 0.0
        return 0.0

    def fraction(self, deleting: bool) -> float:
        """How far the run is, 0..1, its phases weighted by what each costs."""
        weights = DELETE_WEIGHTS if deleting else CHECK_WEIGHTS
        names = [name for name, _w in weights]
        if self.phase in ("report", "done") or (self.phase == "delete" and not deleting):
            return 1.0
        if self.phase not in names:
            return 0.0  # starting, guard
        here = names.index(self.phase)
        done = sum(w for _n, w in weights[:here])
        return round(done + weights[here][1] * self._within(self.phase), 4)

    def eta(self, elapsed: float, deleting: bool) -> float | None:
        """Seconds left; None while too little is known.

        Within a phase whose own counters have a total, that phase's pace says when it ends
        and, through the weights, how long the phases after it take: a cheaper phase before
        it (a warm scan) does not skew the estimate. Otherwise the whole run's pace.
        """
        fraction = self.fraction(deleting)
        if fraction >= 1.0:
            return 0.0
        weights = DELETE_WEIGHTS if deleting else CHECK_WEIGHTS
        names = [name for name, _w in weights]
        within = self._within(self.phase)
        if self.phase in names and self.phase in _OWN_PACE and within >= _MIN_WITHIN:
            here = names.index(self.phase)
            spent = time.monotonic() - self.phase_started
            phase_total = spent / within
            later = sum(w for _n, w in weights[here + 1 :])
            return round(phase_total - spent + phase_total / weights[here][1] * later, 1)
        if self.phase in names and self.phase == "verify":
            # no counters of its own: the phases before it say how long it takes; past that,
            # "a second", not 0 (which says the run is over)
            here = names.index(self.phase)
            spent = time.monotonic() - self.phase_started
            before = sum(w for _n, w in weights[:here])
            return round(max((elapsed - spent) / before * weights[here][1] - spent, 1.0), 1)
        if fraction < _MIN_FRACTION:
            return None
        return round(elapsed * (1 - fraction) / fraction, 1)

    def snapshot(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("phase_started")
        return data
