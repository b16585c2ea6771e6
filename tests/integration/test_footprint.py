"""An idle cluster's processes load only what they use: the idle footprint (README, "idle
footprint" row: at most 0.25x Ray's, with the dashboard running) depends on it.

Each check names a shared library that a process maps once a module is imported, and
what it costs.  ``benchmarks/harness.py --only farpool,ray --workloads footprint``
measures the footprint itself, side by side with Ray.

The driver is a script of its own, as a user's is: under pytest the workers would load
pytest itself as the driver's ``__main__``.
"""

import json
import subprocess
import sys
import textwrap

from farpool_testing import TIMEOUT

# library file prefix -> (what imports it, what it costs each process that maps it)
NOT_WHEN_IDLE = {
    "_hashlib.": "hashlib (OpenSSL, about 4 MB): imported where a digest is made, never at start",
    "_ssl.": "ssl (about 6 MB with http.server): the dashboard imports http.server at its first request",
    "_psutil_linux": "psutil (about 4 MB): the agent reads /proc itself (host_usage.py)",
    "_sqlite3.": "sqlite3 (about 1.5 MB): only a head with tables on disk (farpool start) needs it",
    "_multiarray_umath.": "numpy (about 11 MB): the launcher forks the first workers before it imports "
                          "numpy (launcher.PRELOAD_LATER); a task that uses it imports it",
    "_lzma.": "shutil (with bz2 and lzma, about 0.6 MB): imported where a tree is removed; argparse "
              "imports it to ask for a terminal's width (session.argument_parser gives one)",
    "_ctypes.": "ctypes (about 0.3 MB): the process name goes to /proc/self/comm (session.set_process_name)",
    "_opcode.": "dis, with inspect and dataclasses (about 1.1 MB): farpool's records are plain classes; "
                "cloudpickle imports them, and the launcher preloads it only after the first workers "
                "(launcher.PRELOAD_LATER)",
}

DRIVER = textwrap.dedent("""
    import json
    import os
    import sys

    import farpool


    def numpy_loaded():
        return "numpy" in sys.modules


    def cloudpickle_loaded():
        return "cloudpickle" in sys.modules


    def main():
        import psutil  # (here: workers import this script as __mp_main__)
        info = farpool.init(num_cpus=2)
        assert info.get("dashboard_url"), "the dashboard is part of the idle footprint"
        getpid = farpool.remote(os.getpid)
        farpool.get([getpid.remote() for _ in range(4)], timeout=60)
        found = {}
        for p in psutil.Process().children(recursive=True):
            if p.name().startswith("farpool-"):
                found[f"{p.name()} (pid {p.pid})"] = sorted(
                    os.path.basename(m.path) for m in p.memory_maps(grouped=True) if ".so" in m.path)
        # A first worker loads cloudpickle when a function travels by value (this script's
        # lambda): it was not preloaded for it.
        found["lambda on a first worker"] = farpool.get(farpool.remote(lambda: 7).remote(), timeout=60)
        # A worker forked after the first ones (an initializer gets workers of its own) finds
        # numpy and cloudpickle loaded: the launcher imported them before forking it.
        with farpool.DistributedExecutor(max_workers=1, initializer=os.getpid) as executor:
            found["later worker has numpy"] = executor.submit(numpy_loaded).result(timeout=60)
            found["later worker has cloudpickle"] = executor.submit(cloudpickle_loaded).result(timeout=60)
        farpool.shutdown()
        print(json.dumps(found))


    if __name__ == "__main__":
        main()
""")


def test_the_idle_head_agent_launcher_and_workers_load_only_what_they_use(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=TIMEOUT * 2)
    assert done.returncode == 0, done.stderr
    mapped = json.loads(done.stdout.strip().splitlines()[-1])
    assert mapped.pop("lambda on a first worker") == 7
    assert mapped.pop("later worker has numpy") is True, "launcher.PRELOAD_LATER: numpy for later workers"
    assert mapped.pop("later worker has cloudpickle") is True, "launcher.PRELOAD_LATER: cloudpickle too"
    kinds = {name.split(" ")[0] for name in mapped}
    assert {"farpool-head", "farpool-node", "farpool-launch", "farpool-worker"} <= kinds, mapped.keys()
    found = [f"{process} maps {prefix}*: {why}" for process, libraries in mapped.items()
             for prefix, why in NOT_WHEN_IDLE.items() if any(lib.startswith(prefix) for lib in libraries)]
    assert not found, "an idle process imported more than it uses:\n" + "\n".join(found)
