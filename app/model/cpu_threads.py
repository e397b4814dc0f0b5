"""How many threads torch should use on this machine: one per physical core we may use.

`os.cpu_count()` counts every logical CPU of the host, which oversubscribes a container
limited by a CPU quota or affinity mask, and SMT siblings share one core's FMA units,
so a second thread per core only adds contention to the matmuls.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def default_num_threads() -> int:
    """Physical cores in our affinity mask, capped by the cgroup CPU quota; at least 1."""
    cpus = _allowed_cpus()
    cores = _physical_cores(cpus) or len(cpus)
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _allowed_cpus() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _physical_cores(cpus: set[int]) -> int:
    """Distinct SMT sibling sets among `cpus` (0 when the topology cannot be read)."""
    cores = set()
    for cpu in cpus:
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(path.read_text().strip())
        except OSError:
            return 0
    return len(cores)


def _cgroup_cpu_quota() -> float | None:
    """CPUs the cgroup may use (quota / period), or None when unlimited or unknown."""
    try:
        if _CGROUP_V2_CPU_MAX.is_file():
            quota, period = _CGROUP_V2_CPU_MAX.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if _CGROUP_V1_QUOTA.is_file():
            quota_us = int(_CGROUP_V1_QUOTA.read_text())
            return None if quota_us <= 0 else quota_us / int(_CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        return None
    return None
