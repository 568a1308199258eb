"""A run's summary in the original pruner's words, which scripts already parse."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from daemon.prune import DELETE, Summary
from daemon.units import bytes_size, duration_text

#: phases before the sweep: a run that ends there has decided nothing
UNDECIDED = ("starting", "guard", "scan-repositories", "mark")


def count(n: int, one: str, many: str | None = None) -> str:
    """``1 stale upload``, ``2 stale uploads``."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


@dataclass(frozen=True, slots=True)
class Ending:
    """How a run ended, for its summary: a complete run needs none of this."""

    run_id: str = ""
    state: str = "succeeded"
    phase: str = ""
    error: str | None = None
    grace: float | None = None
    upload_max_age: float | None = None
    #: an untagged/retention run: its manifest and tag lines come first, zero or not
    revisions_pruned: bool = False


def summary_lines(mode: str, summary: Summary, ending: Ending | None = None) -> list[str]:
    """``Would delete N blobs`` ... or ``Deleted N blobs`` ..., plus what else was removed
    and kept; a run that did not succeed says so instead of looking complete."""
    ending = ending or Ending()
    deleting = mode == DELETE
    if ending.state != "succeeded" and ending.phase in UNDECIDED and not summary.blobs:
        # nothing was decided: "Would delete 0 blobs" would be a false answer
        return [
            f"{_run(ending)} {ending.state} during {ending.phase}: nothing was decided"
            + _cause(ending)
        ]
    verb = "Deleted" if deleting else "Would delete"
    lines: list[str] = []
    if ending.revisions_pruned or summary.manifests or summary.tags:
        lines += [f"{verb} {summary.manifests} manifests", f"{verb} {summary.tags} tags"]
    if deleting:
        # the original pruner's exact words, plural or not: scripts parse them
        lines += [f"Deleted {summary.blobs} blobs"]
        if summary.trash_until:
            # moved, not freed: the trash keeps them until then (restore puts them back)
            lines.append(
                f"Moved {summary.blobs} blobs ({bytes_size(summary.bytes)}) to the trash until "
                f"{_date(summary.trash_until)}"
            )
        else:
            lines.append(f"Freed up {bytes_size(summary.bytes)} of disk space")
        if summary.purged_trash_runs:
            lines.append(
                f"Purged the expired trash of {count(summary.purged_trash_runs, 'run')}: "
                f"freed up {bytes_size(summary.purged_trash_bytes)} of disk space"
            )
        verb = "Deleted"
    else:
        lines += [
            f"Would delete {summary.blobs} blobs",
            f"Would free up {bytes_size(summary.bytes)} of disk space",
        ]
        verb = "Would delete"
    if summary.repositories:
        lines.append(f"{verb} {count(summary.repositories, 'repository', 'repositories')}")
    if summary.manifest_links:
        lines.append(f"{verb} {count(summary.manifest_links, 'manifest link')}")
    if summary.uploads:
        lines.append(f"{verb} {count(summary.uploads, 'stale upload')}")
    if summary.too_young:
        limit = f"the {duration_text(ending.grace)} " if ending.grace is not None else "the "
        lines.append(f"Kept {count(summary.too_young, 'blob')} younger than {limit}grace period")
    if summary.uploads_kept:
        limit = (
            f" (--upload-max-age {duration_text(ending.upload_max_age)})"
            if ending.upload_max_age is not None
            else ""
        )
        lines.append(
            f"Kept {count(summary.uploads_kept, 'upload')} younger than the upload age limit{limit}"
        )
    if ending.state == "succeeded":
        if not deleting:
            lines.append("Use mode=delete to actually delete the data")
    else:
        where = f" during {ending.phase}" if ending.phase else ""
        lines.append(f"{_run(ending)} {ending.state}{where}: counts are partial{_cause(ending)}")
    return lines


def restore_line(restore: dict[str, object]) -> str:
    """A restored run's last line: what went back, and when."""
    size = restore.get("bytes", 0)
    return (
        f"Restored {restore.get('objects', 0)} objects ({bytes_size(float(size))}) from the "  # type: ignore[arg-type]
        f"trash at {restore.get('restored_at')}"
    )


def _date(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _run(ending: Ending) -> str:
    return f"Run {ending.run_id}" if ending.run_id else "The run"


def _cause(ending: Ending) -> str:
    return f" ({ending.error})" if ending.error and ending.state != "stopped" else ""
