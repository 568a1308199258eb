"""Prometheus metrics on a registry of their own (no process-global collectors)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
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
        self.registry.register(_ActiveRun(active))

    def record(self, run: Run) -> None:
        self.runs.labels(run.mode, run.state).inc()
        if run.mode == "delete":
            self.blobs_deleted.inc(run.summary.blobs)
            self.bytes_deleted.inc(run.summary.bytes)
        if run.duration is not None:
            self.duration.labels(run.mode).observe(run.duration)

    def render(self) -> bytes:
        return generate_latest(self.registry)
