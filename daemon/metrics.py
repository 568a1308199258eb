"""Prometheus metrics on a registry of their own (no process-global collectors)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon.runs import Run

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _ActiveRun(Collector):
    def __init__(self, active: Callable[[], Run | None]) -> None:
        self.active = active

    def collect(self) -> Iterator[GaugeMetricFamily]:
        run = self.active()
        running = GaugeMetricFamily("registry_pruned_run_active", "1 while a run is active")
        running.add_metric([], 1 if run else 0)
        yield running
        progress = GaugeMetricFamily(
            "registry_pruned_run_progress",
            "counters of the active run",
            labels=["counter"],
        )
        if run is not None:
            for name, value in run.progress.snapshot().items():
                if isinstance(value, int):
                    progress.add_metric([name], value)
        yield progress
        fraction = GaugeMetricFamily(
            "registry_pruned_run_fraction", "how far the active run is, 0..1 over its phases"
        )
        eta = GaugeMetricFamily(
            "registry_pruned_run_eta_seconds", "seconds the active run should still take"
        )
        if run is not None:
            done, left = run.estimate()
            fraction.add_metric([], done)
            if left is not None:
                eta.add_metric([], left)
        yield fraction
        yield eta


class Metrics:
    def __init__(self, active: Callable[[], Run | None]) -> None:
        self.registry = CollectorRegistry()
        self.runs = Counter(
            "registry_pruned_runs",
            "runs by mode and result",
            ["mode", "result"],
            registry=self.registry,
        )
        self.blobs_deleted = Counter(
            "registry_pruned_blobs_deleted", "blobs deleted", registry=self.registry
        )
        self.bytes_deleted = Counter(
            "registry_pruned_bytes_deleted", "bytes freed", registry=self.registry
        )
        self.duration = Histogram(
            "registry_pruned_run_duration_seconds",
            "run duration",
            ["mode"],
            buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, float("inf")),
            registry=self.registry,
        )
        self.broken_images = Gauge(
            "registry_pruned_broken_images",
            "broken images the last verification found (verify runs, and delete runs' own)",
            registry=self.registry,
        )
        self.verified_images = Gauge(
            "registry_pruned_verified_images",
            "images the last verification checked",
            registry=self.registry,
        )
        self.registry.register(_ActiveRun(active))
        # the last outcomes, for alerts (manifests/monitoring); restored from the history
        self.last_success = Gauge(
            "registry_pruned_last_run_success",
            "1 when the last finished run of this mode succeeded, 0 when it failed",
            ["mode"],
            registry=self.registry,
        )
        self.last_success_time = Gauge(
            "registry_pruned_last_success_timestamp_seconds",
            "when the last successful run of this mode ended (Unix time)",
            ["mode"],
            registry=self.registry,
        )
        self.reclaimable_bytes = Gauge(
            "registry_pruned_reclaimable_bytes",
            "what the last successful check would free (0 after a successful delete)",
            registry=self.registry,
        )
        self.reclaimable_blobs = Gauge(
            "registry_pruned_reclaimable_blobs",
            "orphaned blobs the last successful check found (0 after a successful delete)",
            registry=self.registry,
        )

    def outcome(self, mode: str, state: str, ended: float, blobs: int, size: int) -> None:
        """Set the last-run gauges from one finished run (live or from the history)."""
        if state in ("failed", "interrupted"):
            self.last_success.labels(mode).set(0)
        elif state == "succeeded":
            self.last_success.labels(mode).set(1)
            self.last_success_time.labels(mode).set(ended)
            # a delete freed what the check found: nothing known is left to reclaim
            self.reclaimable_blobs.set(blobs if mode == "check" else 0)
            self.reclaimable_bytes.set(size if mode == "check" else 0)

    def restore(self, documents: Iterable[dict[str, Any]]) -> None:
        """The last-run gauges from saved run documents, oldest first."""
        for doc in documents:
            try:
                ended = datetime.fromisoformat(str(doc.get("finished_at"))).timestamp()
            except ValueError:
                continue
            summary = doc.get("summary") or {}
            self.outcome(
                str(doc.get("mode")),
                str(doc.get("state")),
                ended,
                int(summary.get("blobs", 0)),
                int(summary.get("bytes", 0)),
            )

    def record(self, run: Run) -> None:
        self.outcome(run.mode, run.state, time.time(), run.summary.blobs, run.summary.bytes)
        self.runs.labels(run.mode, run.state).inc()
        if run.mode == "delete":
            self.blobs_deleted.inc(run.summary.blobs)
            self.bytes_deleted.inc(run.summary.bytes)
        if run.verification is not None:
            self.broken_images.set(run.verification.broken)
            self.verified_images.set(run.verification.images)
        if run.duration is not None:
            self.duration.labels(run.mode).observe(run.duration)

    def render(self) -> bytes:
        return generate_latest(self.registry)
