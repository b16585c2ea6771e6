"""This machine's CPU and memory use, for the node agent's heartbeat (the dashboard's plots).

Called by the node agent on its heartbeat timer (its I/O thread), about once a second;
a few tens of microseconds (two small reads of /proc).  Owns nothing but the CPU
counters of the last call.  Reads /proc itself, as psutil does on Linux, so the agent
does not import psutil (about 4 MB of an idle agent's memory).  ``cpu_count`` gives the
agent its default ``num_cpus`` once, at start.
"""

from __future__ import annotations

import math
import os

# Where a cgroup's CPU bandwidth limit is read: v2's "QUOTA PERIOD" (or "max PERIOD"), else v1's two files.
CGROUP_CPU_FILES = ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
                    "/sys/fs/cgroup/cpu/cpu.cfs_period_us")

_last_cpu: tuple[int, int] | None = None  # (busy, total) jiffies at the last call


def memory() -> tuple[int, int]:
    """(total, available) bytes of this machine's memory (MemAvailable: what psutil calls available)."""
    fields = {}
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            name, _, rest = line.partition(b":")
            if name in (b"MemTotal", b"MemAvailable", b"MemFree", b"Buffers", b"Cached"):
                fields[name] = int(rest.split()[0]) * 1024
    total = fields[b"MemTotal"]
    available = fields.get(b"MemAvailable")
    if available is None:  # (kernels before 3.14)
        available = fields.get(b"MemFree", 0) + fields.get(b"Buffers", 0) + fields.get(b"Cached", 0)
    return total, available


def cpu_percent() -> float:
    """Busy share of all cores since the last call, 0-100 (0.0 on the first call)."""
    global _last_cpu
    with open("/proc/stat", "rb") as f:
        times = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is counted in user already)
    total = sum(times[:8])
    busy = total - times[3] - (times[4] if len(times) > 4 else 0)
    last, _last_cpu = _last_cpu, (busy, total)
    if last is None or total <= last[1]:
        return 0.0
    return max(0.0, min(100.0, 100.0 * (busy - last[0]) / (total - last[1])))


def host() -> dict:
    """{"cpu_percent": since the last call (0-100, all cores), "memory_used", "memory_total": bytes}."""
    try:
        total, available = memory()
        return {"cpu_percent": cpu_percent(), "memory_used": total - available, "memory_total": total}
    except (OSError, ValueError, KeyError, IndexError):  # a heartbeat never fails for want of a number
        return {}


def cpu_count() -> int:
    """The CPUs this process may use, counted as ``loky.cpu_count()`` counts them (API.md's default
    ``num_cpus``) without importing loky, 65-140 ms of the agent's start-up here: the least of the
    machine's CPUs, the affinity mask, the cgroup's CPU bandwidth quota rounded up, and
    ``LOKY_MAX_CPU_COUNT``; at least 1."""
    machine = os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, NotImplementedError, OSError):
        allowed = machine
    limit = int(os.environ.get("LOKY_MAX_CPU_COUNT", machine))
    return max(1, min(machine, allowed, cgroup_cpus(machine), limit))


def cgroup_cpus(machine: int, files: tuple[str, str, str] = CGROUP_CPU_FILES) -> int:
    """The CPUs a cgroup's bandwidth limit allows (quota / period, rounded up); ``machine`` when
    there is no limit or no cgroup."""
    v2, v1_quota, v1_period = files
    quota = period = None
    try:
        with open(v2) as f:
            fields = f.read().split()
        if len(fields) == 2:
            quota, period = fields
    except OSError:
        pass
    if quota is None:
        try:
            with open(v1_quota) as f:
                quota = f.read().strip()
            with open(v1_period) as f:
                period = f.read().strip()
        except OSError:
            return machine
    if quota == "max":
        return machine
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return machine
    return math.ceil(quota_us / period_us) if quota_us > 0 and period_us > 0 else machine
