"""How many CPUs this process can use: its affinity, capped by its cgroup's CPU quota."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP) -> int:
    """CPUs the scheduler gives this process; a pod's ``limits.cpu`` counts, rounded up."""
    # os.cpu_count() is the node's: a sidecar limited to one CPU on a 32-core node would
    # start processes and threads for 32
    count = len(os.sched_getaffinity(0))
    quota = cgroup_quota(proc_cgroup, root)
    return max(1, min(count, math.ceil(quota))) if quota is not None else count


def cgroup_quota(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP) -> float | None:
    """This process's cgroup CPU quota in CPUs (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``);
    None when there is none or it cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        where = path.strip().lstrip("/")
        if hierarchy == "0" and not controllers:
            # v2: "<quota|max> <period>"; on a v1 host the v2 tree has no cpu.max
            found = _read(root / where / "cpu.max")
        elif "cpu" in controllers.split(","):
            v1 = root / "cpu" / where
            found = _read(v1 / "cpu.cfs_quota_us", v1 / "cpu.cfs_period_us")  # -1: none
        else:
            continue
        if found is not None:
            return found
    return None


def _read(*files: Path) -> float | None:
    try:
        words = " ".join(f.read_text() for f in files).split()
        quota, period = int(words[0]), int(words[1])
    except (OSError, ValueError, IndexError):
        return None  # "max", no such file, or a format this code does not know
    return quota / period if quota > 0 and period > 0 else None
