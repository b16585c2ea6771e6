"""The chaos suite's bounded run (#13): chaos_harness.Chaos on a head and three node agents for
CHAOS_SECONDS (FARPOOL_CHAOS_SECONDS overrides) while workers, node agents and once the head
are SIGKILLed (and a node drained) at times drawn from a seed: FARPOOL_CHAOS_SEED, else CHAOS_SEED, so that CI
replays one fault plan (runs by hand draw new seeds); printed, and in the failure message, to
replay with ``python -m tests.chaos.run --seed S``.

It fails on any wrong result, an error other than the documented ones, a call that did not
answer within chaos_harness.CALL_TIMEOUT_S, or anything left behind (processes, session directories, /dev/shm entries; the suite's conftest
checks once more at the end of the run).

tests/hosts/test_chaos_on_hosts.py runs this test again inside a network-namespace host, with
each node agent on a host of its own (``started`` is then a farpool_testing.HostsCluster).
"""

import os

import pytest

import chaos_harness

# Seconds of workload in CI: with the start and stop of four nodes this stays within about
# 90 s on two loaded cores. A long run by hand: python -m tests.chaos.run --minutes 10.
CHAOS_SECONDS = float(os.environ.get("FARPOOL_CHAOS_SECONDS", "40"))
# The fault plan of the CI run: a node kill, a drain, the head kill and several worker kills.
CHAOS_SEED = 1


@pytest.mark.timeout(CHAOS_SECONDS + 4 * chaos_harness.CALL_TIMEOUT_S)
def test_a_mixed_workload_survives_killed_workers_nodes_and_a_head(started):
    seed = int(os.environ.get("FARPOOL_CHAOS_SEED") or CHAOS_SEED)
    print(f"\nchaos seed {seed} (replay: FARPOOL_CHAOS_SEED={seed}, or python -m tests.chaos.run --seed {seed})")
    report = chaos_harness.Chaos(started, seed, CHAOS_SECONDS).run()
    report.leftovers += started.leftovers(os.environ["FARPOOL_SHM_PATH"])  # (on every host, on hosts)
    print(report.text())
    kinds = {fault.kind for fault, _, what in report.faults if not what.startswith("not injected")}
    planned = {fault.kind for fault, _, _ in report.faults}  # (the CI seed plans every kind; others may not)
    assert kinds == planned, f"seed {seed}: not every kind of fault planned was injected\n{report.text()}"
    if seed == CHAOS_SEED:
        assert kinds == {"worker", "node", "drain", "head"}, f"seed {seed}: not every kind of fault was injected\n{report.text()}"
    assert not report.failures, f"seed {seed}: wrong results, other errors or hangs\n{report.text()}"
    assert not report.leftovers, f"seed {seed}: left behind\n{report.text()}"
    assert report.calls["chains"] and report.calls["map"] and report.calls["actor"] and report.calls["arrays"]
