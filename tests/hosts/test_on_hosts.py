"""The cluster across separate hosts (network namespaces with their own addresses)."""

import json
import textwrap

WHERE = textwrap.dedent("""
    import json, os, socket
    import farpool

    @farpool.remote
    def where(tag):
        ctx = farpool.get_runtime_context()
        return {"tag": tag, "node": ctx.node_id}

    farpool.init()
    nodes = [{"node_id": n["node_id"], "address": n["address"], "alive": n["alive"],
              "resources": n["resources_total"]} for n in farpool.nodes()]
    results = {}
    for n in nodes:
        custom = [r for r in n["resources"] if r.startswith("on_")]
        if custom:
            results[custom[0]] = farpool.get([where.options(resources={custom[0]: 1}).remote(custom[0])
                                              for _ in range(3)], timeout=60)
    print(json.dumps({"nodes": nodes, "results": results}))
    farpool.shutdown()
""")


def test_a_node_joined_with_the_printed_command_runs_tasks(hosts_cluster, bed):
    """The issue's reproduction: head on h1 with --host, the printed join command on h2."""
    hosts_cluster.start_head()
    out = hosts_cluster.join(bed[1], "--resources", '{"on_h2": 1}')
    assert "joined" in out.stdout
    report = json.loads(hosts_cluster.driver(bed[0], WHERE).stdout.splitlines()[-1])
    by_resource = {r: n for n in report["nodes"] for r in n["resources"] if r.startswith("on_")}
    assert by_resource["on_h2"]["address"].startswith(bed[1].address + ":"), report["nodes"]
    assert {r["node"] for r in report["results"]["on_h2"]} == {by_resource["on_h2"]["node_id"]}


def test_a_node_finds_its_address_on_the_route_to_the_head(hosts_cluster, bed):
    hosts_cluster.start_head()
    assert "loopback" not in hosts_cluster.head_output
    assert hosts_cluster.address.startswith(bed[0].address + ":")
    out = hosts_cluster.join(bed[2])
    assert f"reach it at {bed[2].address}:" in out.stdout
    # A loopback address given by hand is refused: no other machine could reach it.
    refused = hosts_cluster.join(bed[1], "--node-ip", "127.0.0.1", check=False)
    assert refused.returncode != 0
    assert "would register 127.0.0.1, a loopback address" in refused.stderr
    assert "Give --node-ip an address" in refused.stderr
