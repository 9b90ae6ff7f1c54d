"""The CPUs this process may use: its affinity, bounded by the CPU limit of the container it runs in.

The affinity (and os.cpu_count) counts every core of the host, while a container limited to 4 CPUs (a Kubernetes
`resources.limits.cpu`, a cgroup quota) gets 4 cores' worth of time. Sized from the host, each model's ONNX Runtime
thread pool puts dozens of threads on those 4 CPUs, which then wait on each other, and on a 64-core node 200 models
would start some 12,600 threads, enough to reach a pod's pid limit. Runtimes that size pools from the machine (Go,
the JVM, .NET) read the quota for the same reason.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["CGROUP_ROOT", "PROC_CGROUP", "cgroup_cpu_limit", "usable_cpus"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _own_cgroups(proc_cgroup: Path) -> tuple[list[str], list[str]]:
    """The process's cgroup paths from /proc/self/cgroup: cgroup v2's ("0::/path"), then v1's cpu controller's."""
    v2: list[str] = []
    v1: list[str] = []
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            v2.append(path.lstrip("/"))
        elif "cpu" in controllers.split(","):
            v1.append(path.lstrip("/"))
    return v2, v1


def _levels(base: Path, own: list[str]) -> list[Path]:
    """`base` joined with each own cgroup path and each of its parents, down to `base` itself, once each."""
    seen: dict[Path, None] = {}
    for path in own:
        parts = [p for p in path.split("/") if p]
        for n in range(len(parts), 0, -1):
            seen.setdefault(base.joinpath(*parts[:n]))
    seen.setdefault(base)
    return list(seen)


def _v2_limit(directory: Path) -> float | None:
    fields = (_read(directory / "cpu.max") or "").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(directory: Path) -> float | None:
    try:
        quota = int(_read(directory / "cpu.cfs_quota_us") or "")
        period = int(_read(directory / "cpu.cfs_period_us") or "")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root: Path | None = None, proc_cgroup: Path | None = None) -> float | None:
    """CPUs' worth of time the process's cgroups let it use, or None when none sets a limit (or none can be read):
    cgroup v2's cpu.max ("400000 100000" is 4), v1's cpu.cfs_quota_us over cpu.cfs_period_us. The lowest over the
    process's own cgroup (its path in /proc/self/cgroup) and each parent up to the root, which is where a
    container sees its own cgroup: a limit set on a pod's cgroup binds the containers under it."""
    root = CGROUP_ROOT if root is None else root
    v2, v1 = _own_cgroups(PROC_CGROUP if proc_cgroup is None else proc_cgroup)
    limits = [_v2_limit(d) for d in _levels(root, v2)]
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        limits += [_v1_limit(d) for d in _levels(root / mount, v1)]
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def usable_cpus(root: Path | None = None, proc_cgroup: Path | None = None) -> int:
    """Cores this process may run on (its affinity), at most its cgroup's CPU limit rounded up; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)
