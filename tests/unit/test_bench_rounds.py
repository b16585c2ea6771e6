"""benchmarks/harness.py --rounds: each ratio is the median of the rounds' own ratios, each
metric the median of the rounds' (pure functions of the children's results: no cluster)."""

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, os.path.abspath(BENCH))
    try:
        import harness
        yield harness
    finally:
        sys.path.remove(os.path.abspath(BENCH))


def child(rate, status="ok"):
    return {"status": "ok", "wall_s": 1.0,
            "results": {"noop": {"status": status, "metrics": {"tasks_per_s": rate}}}}


def test_ratio_is_the_median_of_each_rounds_own_ratio(harness):
    # round ratios 2.0, 0.6, 0.92: their median is 0.92, while the medians' ratio would be 1.0
    rounds = [{"farpool": child(100), "mp_pool": child(50)},
              {"farpool": child(60), "mp_pool": child(100)},
              {"farpool": child(120), "mp_pool": child(130)}]
    report = {"rounds": rounds, "systems": {s: harness.merge_rounds([r[s] for r in rounds])
                                            for s in ("farpool", "mp_pool")}}
    assert report["systems"]["farpool"]["results"]["noop"]["metrics"]["tasks_per_s"] == 100
    assert report["systems"]["mp_pool"]["results"]["noop"]["metrics"]["tasks_per_s"] == 100
    assert report["systems"]["farpool"]["wall_s"] == 3.0
    assert harness._ratio_cell(report, "noop", "tasks_per_s", "mp_pool", None) == "0.92x (0.60-2.00)"
    # one round only: the ratio of the two values, as before --rounds
    single = {"systems": rounds[0]}
    assert harness._ratio_cell(single, "noop", "tasks_per_s", "mp_pool", None) == "2.00x"


def test_a_round_that_failed_a_workload_is_left_out(harness):
    rounds = [{"farpool": child(100), "mp_pool": child(50)},
              {"farpool": child(None, status="error"), "mp_pool": child(100)},
              {"farpool": child(90), "mp_pool": child(100)}]
    merged = harness.merge_rounds([r["farpool"] for r in rounds])
    assert merged["results"]["noop"]["metrics"]["tasks_per_s"] == 95
    report = {"rounds": rounds, "systems": {}}
    assert harness._ratio_cell(report, "noop", "tasks_per_s", "mp_pool", None) == "1.45x (0.90-2.00)"
    assert harness._ratio_cell(report, "map", "items_per_s", "mp_pool", None) == "–"


def test_a_workload_failed_in_the_first_round_is_taken_from_the_next(harness):
    merged = harness.merge_rounds([child(None, status="error"), child(80), child(70)])
    assert merged["results"]["noop"] == {"status": "ok", "metrics": {"tasks_per_s": 75}}


def test_a_workload_the_first_round_never_reached_is_taken_from_the_next(harness):
    crashed = {"status": "partial", "wall_s": 1.0, "results": {}}  # the child died before "noop"
    merged = harness.merge_rounds([crashed, child(80), child(60)])
    assert merged["results"]["noop"] == {"status": "ok", "metrics": {"tasks_per_s": 70}}
