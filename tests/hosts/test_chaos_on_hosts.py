"""The chaos suite's bounded run (tests/chaos/test_chaos.py) with each node agent on a host of
its own (#13): the same workload, fault plan and checks as on loopback, over real addresses.

The test runs inside host h1 (with the head, its node and the driver) and its three other
node agents join from h2, h3 and h4; a node started in place of a killed or drained one goes
to the next of them in turn.  Its faults reach the victims on their hosts through this
process (farpool_testing.HostsCluster, pytest_on_hosts): a worker or an agent SIGKILLed
there, ``farpool stop --node`` run there.  Afterwards every host is checked here too: no
process, no session directory, no farpool segment in /dev/shm.
"""

import os
import re

import pytest

from farpool_testing import HOSTS_ROOT, pytest_on_hosts

# h1 for the head and the driver, h2-h4 for a node agent each: one host more than the other
# modules' beds (about a second more to make).
BED_HOSTS = 4
# Seconds of workload: shorter than on loopback (each agent is started and reached through a
# command on its host), still long enough for the CI seed's plan to hold every kind of fault.
# With the bed and the start and stop of four nodes, the case takes about 35 s on two loaded
# cores. FARPOOL_CHAOS_SECONDS overrides it (a longer run by hand).
CHAOS_SECONDS = float(os.environ.get("FARPOOL_CHAOS_SECONDS", "25"))
# The test as tests/chaos runs it (its seed: FARPOOL_CHAOS_SEED when set, to replay a run).
CHAOS_TEST = "chaos/test_chaos.py::test_a_mixed_workload_survives_killed_workers_nodes_and_a_head"


@pytest.mark.timeout(CHAOS_SECONDS + 570)  # (the inner run's own deadlines end a hang first and say where)
def test_the_chaos_run_passes_with_each_node_agent_on_a_host_of_its_own(bed):
    env = {"FARPOOL_CHAOS_SECONDS": str(CHAOS_SECONDS)}
    if os.environ.get("FARPOOL_CHAOS_SEED"):
        env["FARPOOL_CHAOS_SEED"] = os.environ["FARPOOL_CHAOS_SEED"]
    out = pytest_on_hosts(bed, "chaos", [CHAOS_TEST], env=env, options=["-s"], timeout=CHAOS_SECONDS + 530)
    print(out.stdout)  # (the chaos report, with pytest -s)
    assert out.returncode == 0 and "1 passed" in out.stdout, f"the chaos run on separate hosts:\n{out.stdout}"
    injected = re.search(r"^chaos seed=\d+: .* faults injected \((.*)\)$", out.stdout, re.M)
    assert injected, f"no chaos report in the output:\n{out.stdout}"
    assert {kind.split()[1] for kind in injected.group(1).split(", ")} == {"worker", "node", "drain", "head"}
    # The node agents it killed and drained were on the other hosts.
    faults = re.findall(r"^  fault at .*: (node|drain): (.*)$", out.stdout, re.M)
    assert faults and all(re.search(r"on host h[2-4]", what) for _, what in faults), faults
    left = {}
    for host in bed.hosts:
        found = [f"process {pid}" for pid in host.processes()]
        for root in sorted({HOSTS_ROOT, *(f"/tmp/{d}" for d in os.listdir(host.path("/tmp")) if d.startswith("fpt-"))}):
            if os.path.isdir(host.path(root)):
                found += [f"session directory {root}/{d}" for d in os.listdir(host.path(root)) if d.startswith("s-")]
        found += [f"/dev/shm entry {d}" for d in os.listdir(host.path("/dev/shm"))
                  if d.startswith(("farpool-", "fpt-"))]
        if found:
            left[host.name] = found
    assert not left, f"left behind on the hosts: {left}"
