"""A run's summary in the original pruner's words, which scripts already parse."""

from __future__ import annotations

from daemon.prune import DELETE, Summary
from daemon.units import bytes_size


def summary_lines(mode: str, summary: Summary) -> list[str]:
    """``Would delete N blobs`` ... or ``Deleted N blobs`` ..., plus what else was removed."""
    if mode == DELETE:
        lines = [
            f"Deleted {summary.blobs} blobs",
            f"Freed up {bytes_size(summary.bytes)} of disk space",
        ]
        verb = "Deleted"
    else:
        lines = [
            f"Would delete {summary.blobs} blobs",
            f"Would free up {bytes_size(summary.bytes)} of disk space",
        ]
        verb = "Would delete"
    if summary.repositories:
        lines.append(f"{verb} {summary.repositories} repositories")
    if summary.manifest_links:
        lines.append(f"{verb} {summary.manifest_links} manifest links")
    if summary.uploads:
        lines.append(f"{verb} {summary.uploads} stale uploads")
    if summary.too_young:
        lines.append(f"Kept {summary.too_young} blobs younger than the grace period")
    if mode != DELETE:
        lines.append("Use mode=delete to actually delete the data")
    return lines
