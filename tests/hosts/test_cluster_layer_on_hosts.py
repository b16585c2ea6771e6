"""The cluster tests that matter for separate addresses, run again with each node on a host
of its own: two nodes, objects and copies between nodes, actors across nodes, lineage,
a driver joined by address.

Each case runs pytest on those tests *inside* host h1 (the driver and the head live
there, as on the loopback cluster, where the test process is the driver); their
``started`` cluster (tests/conftest.py, farpool_testing.HostsCluster) starts the head
with ``--host`` h1's address and each added node on h2, then h3, in turn.  What the
tests do on other hosts (start a node agent, read its state file, kill -9 it, stop it)
they ask of this process over a socket pair it passes them; it runs the command on the
host (tests/netns.py; farpool_testing.pytest_on_hosts).  One bed serves the whole module.

Tests left out, and why: those about one machine (agents sharing its memory, ``auto``
address, ``farpool stop`` ending a machine's processes) or that read another node's
agent process with psutil (a pid of another host); the wrong-token and wrong-address
cases, which tests/hosts/test_cluster_on_hosts.py covers between hosts already.
"""

import pytest

from farpool_testing import pytest_on_hosts

SELECTED = {
    "test_two_nodes.py": [
        "test_custom_resource_runs_on_the_second_node_through_its_tcp_port",
        "test_worker_killed_on_the_remote_node_is_retried",
        "test_killed_node_agent_is_declared_dead_and_its_tasks_fail_over",
        "test_borrows_held_on_a_node_that_dies_are_released",
    ],
    "test_cross_node_objects.py": [
        "test_a_task_on_another_node_reads_borrowed_refs_through_the_agents",
        "test_an_actor_on_another_node_reads_a_kept_ref_later",
        "test_the_driver_reads_a_value_owned_by_a_worker_on_another_node",
        "test_releases_reach_owners_on_other_nodes",
        "test_a_borrowed_value_of_a_killed_node_fails_clearly",
    ],
    "test_copies_between_nodes.py": [
        "test_readers_on_another_node_share_one_copy_that_the_owner_frees",
        "test_a_copy_is_pulled_from_every_node_that_holds_one",
        "test_a_large_argument_by_value_is_copied_for_the_call_and_freed_after_it",
        "test_a_copy_comes_from_the_other_holders_when_one_node_died",
        "test_a_large_result_stays_on_its_node_until_read_elsewhere",
    ],
    "test_actors_cluster.py": ["test_actor_on_another_node_is_called_through_its_agent"],
    "test_lineage.py": [
        "test_results_lost_with_their_node_are_rebuilt_with_their_lost_arguments",
        "test_a_lost_result_whose_task_has_no_retries_is_an_object_lost_error_saying_why",
    ],
    "test_tcp_driver_puts.py": ["test_a_large_put_goes_to_the_node_store_and_every_reader_finds_it"],
}


@pytest.mark.parametrize("module", list(SELECTED))
def test_the_cluster_tests_pass_with_each_node_on_its_own_host(bed, module):
    out = pytest_on_hosts(bed, module[:-3], [f"cluster/{module}::{name}" for name in SELECTED[module]])
    print(out.stdout)  # (its timings, with pytest -s)
    assert out.returncode == 0, f"tests/cluster/{module} on separate hosts:\n{out.stdout}"
    assert f"{len(SELECTED[module])} passed" in out.stdout, out.stdout
    for host in bed.hosts:  # the tests stopped every runtime process of every host
        assert host.processes() == [], f"processes left on {host.name}: {host.processes()}"
