"""The node agent's default ``num_cpus`` (host_usage.cpu_count) counts as ``loky.cpu_count()``
does (API.md), without importing loky at the agent's start."""

import os

import loky
import pytest

from farpool._private import host_usage


def test_the_count_is_lokys_on_this_machine():
    assert host_usage.cpu_count() == loky.cpu_count()


def test_loky_max_cpu_count_lowers_it(monkeypatch):
    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "1")
    assert host_usage.cpu_count() == loky.cpu_count() == 1


def _files(tmp_path, v2=None, quota=None, period=None):
    paths = (tmp_path / "cpu.max", tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us")
    for path, text in zip(paths, (v2, quota, period)):
        if text is not None:
            path.write_text(text + "\n")
    return tuple(str(p) for p in paths)


@pytest.mark.parametrize("v2, quota, period, expected", [
    ("150000 100000", None, None, 2),          # v2: 1.5 CPUs of bandwidth round up
    ("max 100000", None, None, 16),            # v2 without a limit
    ("200000 100000", "50000", "100000", 2),   # v2 wins over v1
    (None, "50000", "100000", 1),              # v1
    (None, "-1", "100000", 16),                # v1: a negative quota is no limit
    ("garbage", "300000", "100000", 3),        # v2 unreadable: v1
    (None, None, None, 16),                    # no cgroup files
])
def test_a_cgroup_bandwidth_limit_is_read_from_v2_then_v1(tmp_path, v2, quota, period, expected):
    assert host_usage.cgroup_cpus(16, _files(tmp_path, v2, quota, period)) == expected


def test_the_count_is_at_most_the_affinity_mask():
    assert 1 <= host_usage.cpu_count() <= len(os.sched_getaffinity(0))
