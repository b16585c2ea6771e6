"""Large data through a small object store: farpool's spilling next to the disk and Ray.

    python benchmarks/spill.py [--total-gib 6] [--store-gib 2] [--object-mib 512]
                               [--ray-python /work/venv-bench/bin/python] [--dir DIR]

One run, one machine, one disk: (1) a plain sequential write and read of the same
bytes to the same directory (the disk's own speed, as the spill sees it: no fsync,
through the page cache); (2) farpool: ``put`` of ``total`` bytes of arrays into a
store of ``store`` bytes, a task reading each (restores), then tasks returning
arrays of the same size that the driver reads (results spill too); (3) Ray, the same
program, in its own venv (``--ray-python``; skipped with a reason when absent).
Each system runs in a child process; the parent samples the peak RSS of every
process of the run.  Prints a table and the ratios; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

MiB = 1 << 20
GiB = 1 << 30
HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------- the workload (child)
def workload(system: str, store_bytes: int, total: int, object_bytes: int, spill_dir: str) -> dict:
    import numpy as np
    if system == "ray":
        import ray as rt
        rt.init(num_cpus=2, object_store_memory=store_bytes, include_dashboard=False,
                _system_config={"object_spilling_config": json.dumps(
                    {"type": "filesystem", "params": {"directory_path": spill_dir}})})
    else:
        import farpool as rt
        rt.init(num_cpus=2, object_store_memory=store_bytes, spill_dir=spill_dir)

    @rt.remote
    def ends(a):
        return float(a[0]) + float(a[-1])

    @rt.remote
    def make(i, n):
        import numpy
        return numpy.full(n // 8, float(i))

    n = total // object_bytes
    phases = {}
    t = time.perf_counter()
    refs = [rt.put(np.full(object_bytes // 8, float(i))) for i in range(n)]
    phases["put"] = time.perf_counter() - t
    t = time.perf_counter()
    assert rt.get([ends.remote(r) for r in refs]) == [2.0 * i for i in range(n)]
    phases["tasks read"] = time.perf_counter() - t
    t = time.perf_counter()
    results = [make.remote(i, object_bytes) for i in range(n)]
    for i, r in enumerate(results):
        v = rt.get(r)
        assert v[0] == v[-1] == float(i)
        del v
    phases["results"] = time.perf_counter() - t
    out = {"phases": phases, "objects": n}
    if system == "ray":
        from ray._private.internal_api import memory_summary
        text = memory_summary(stats_only=True)
        out["summary"] = text
        import re
        spilled = re.search(r"Spilled (\d+) MiB, (\d+) objects, avg write throughput (\d+) MiB/s", text)
        restored = re.search(r"Restored (\d+) MiB, (\d+) objects, avg read throughput (\d+) MiB/s", text)
        if spilled:
            out["spilled_bytes"] = int(spilled.group(1)) * MiB
            out["spill_gbps"] = int(spilled.group(3)) * MiB / 1e9
        if restored:
            out["restored_bytes"] = int(restored.group(1)) * MiB
            out["restore_gbps"] = int(restored.group(3)) * MiB / 1e9
    else:
        client = rt.api._client()
        stats, _ = client.agent_request(client.home, "StoreStats", ())
        out["spilled_bytes"] = stats["spilled_bytes_total"]
        out["restored_bytes"] = stats["restored_bytes_total"]
        # Bytes over the time any move of the kind ran (what the disk saw, like Ray's figure);
        # per_move: over the summed time of the moves (several run at once).
        out["spill_gbps"] = stats["spilled_bytes_total"] / max(stats["spill_busy_seconds"], 1e-9) / 1e9
        out["restore_gbps"] = stats["restored_bytes_total"] / max(stats["restore_busy_seconds"], 1e-9) / 1e9
        out["spill_gbps_per_move"] = stats["spilled_bytes_total"] / max(stats["spill_seconds"], 1e-9) / 1e9
        out["restore_gbps_per_move"] = stats["restored_bytes_total"] / max(stats["restore_seconds"], 1e-9) / 1e9
        out["on_disk_allocations"] = stats["on_disk_allocations"]
        out["heartbeat_gap_max_s"] = stats["heartbeat_gap_max_s"]
        out["loop_lag_max_s"] = stats["loop_lag_max_s"]
    del refs, results, r
    rt.shutdown()
    return out


# --------------------------------------------------------------------------- the disk's own speed
def disk_speed(directory: str, total: int, object_bytes: int) -> dict:
    """Sequential write then read of ``total`` bytes in files of ``object_bytes``, 64 MiB a call."""
    import numpy as np
    chunk = np.ones(64 * MiB // 8)
    buf = memoryview(chunk).cast("B")
    paths = [os.path.join(directory, f"plain-{i}") for i in range(total // object_bytes)]
    t = time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for _ in range(object_bytes // len(buf)):
            os.write(fd, buf)
        os.close(fd)
    write_s = time.perf_counter() - t
    out = bytearray(64 * MiB)
    t = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(out):
                pass
    read_s = time.perf_counter() - t
    for path in paths:
        os.unlink(path)
    return {"write_gbps": total / write_s / 1e9, "read_gbps": total / read_s / 1e9}


# --------------------------------------------------------------------------- running a child, sampling RSS
def run_child(python: str, system: str, args, spill_dir: str) -> dict:
    import psutil
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), os.path.join(HERE, "..", "src")) if p)
    cmd = [python, os.path.abspath(__file__), "--child", system, "--store-gib", str(args.store_gib),
           "--total-gib", str(args.total_gib), "--object-mib", str(args.object_mib), "--dir", spill_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    peaks: dict = {}
    done = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    name = " ".join(p.cmdline()[1:3]) if p.name().startswith("python") else p.name()
                    rss = p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
                    continue
                key = _kind(name)
                peaks[key] = max(peaks.get(key, 0), rss)
            done.wait(0.2)  # a benchmark's sampler, not a test: a period is what it needs
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - t
    done.set()
    sampler.join()
    if proc.returncode != 0:
        return {"error": f"exited with {proc.returncode}", "peak_rss": peaks}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    result["peak_rss"] = peaks
    return result


def _kind(name: str) -> str:
    for key in ("farpool._private.head", "farpool._private.node", "farpool._private.worker",
                "farpool._private.launcher"):
        if key in name:
            return key.rsplit(".", 1)[1]
    if "spill.py" in name:
        return "driver"
    return name.split()[0][:40] if name else "?"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--total-gib", type=float, default=6)
    parser.add_argument("--store-gib", type=float, default=2)
    parser.add_argument("--object-mib", type=int, default=512)
    parser.add_argument("--ray-python", default="/work/venv-bench/bin/python")
    parser.add_argument("--dir", default=None, help="spill directory (default: a new one under /tmp)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    store_bytes, total = int(args.store_gib * GiB), int(args.total_gib * GiB)
    object_bytes = args.object_mib * MiB
    if args.child:
        print(json.dumps(workload(args.child, store_bytes, total, object_bytes, args.dir)))
        return 0
    base = args.dir or tempfile.mkdtemp(prefix="fp-spill-bench-", dir="/tmp")
    results = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "kernel": platform.release(), "dir": base,
                           "load_avg_at_start": os.getloadavg()[0]}}
    results["disk"] = disk_speed(base, total, object_bytes)
    print(f"disk: write {results['disk']['write_gbps']:.2f} GB/s, read {results['disk']['read_gbps']:.2f} GB/s",
          flush=True)
    systems = [("farpool", sys.executable)]
    if os.path.exists(args.ray_python):
        systems.append(("ray", args.ray_python))
    else:
        results["ray"] = {"error": f"no Ray: {args.ray_python} does not exist"}
    for system, python in systems:
        spill_dir = os.path.join(base, system)
        os.makedirs(spill_dir, exist_ok=True)
        results[system] = run_child(python, system, args, spill_dir)
        shutil.rmtree(spill_dir, ignore_errors=True)
        print(system, json.dumps({k: v for k, v in results[system].items() if k != "summary"}), flush=True)
    results["machine"]["load_avg_at_end"] = os.getloadavg()[0]
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def report(results: dict) -> str:
    disk = results["disk"]
    lines = ["| | farpool | Ray | disk alone |", "|---|---|---|---|"]
    fp, ray = results.get("farpool", {}), results.get("ray", {})

    def cell(r, key, fmt="{:.2f}"):
        v = r.get(key)
        return fmt.format(v) if isinstance(v, (int, float)) else "n/a"
    lines.append(f"| spill GB/s | {cell(fp, 'spill_gbps')} | {cell(ray, 'spill_gbps')} | {disk['write_gbps']:.2f} (write) |")
    lines.append(f"| restore GB/s | {cell(fp, 'restore_gbps')} | {cell(ray, 'restore_gbps')} | {disk['read_gbps']:.2f} (read) |")
    lines.append(f"| GB spilled / restored | {fp.get('spilled_bytes', 0) / 1e9:.1f} / {fp.get('restored_bytes', 0) / 1e9:.1f} "
                 f"| {ray.get('spilled_bytes', 0) / 1e9:.1f} / {ray.get('restored_bytes', 0) / 1e9:.1f} | |")
    for phase in ("put", "tasks read", "results"):
        lines.append(f"| {phase} s | {cell(fp.get('phases', {}), phase)} | {cell(ray.get('phases', {}), phase)} | |")
    lines.append(f"| wall s | {cell(fp, 'wall_s')} | {cell(ray, 'wall_s')} | |")
    lines.append(f"| agent's largest heartbeat gap s | {cell(fp, 'heartbeat_gap_max_s')} | n/a | |")
    lines.append(f"| agent loop's largest delay s | {cell(fp, 'loop_lag_max_s')} | n/a | |")
    for name, r in (("farpool", fp), ("Ray", ray)):
        peaks = ", ".join(f"{k} {v / MiB:.0f}" for k, v in sorted(r.get("peak_rss", {}).items()))
        lines.append(f"\npeak RSS MiB ({name}; shared memory mapped counts in RSS): {peaks}")
    if fp.get("spill_gbps") and ray.get("spill_gbps"):
        lines.append(f"\nratios: farpool/disk spill {fp['spill_gbps'] / disk['write_gbps']:.2f}, restore "
                     f"{fp['restore_gbps'] / disk['read_gbps']:.2f}; farpool/Ray spill "
                     f"{fp['spill_gbps'] / ray['spill_gbps']:.2f}, restore {fp['restore_gbps'] / ray['restore_gbps']:.2f}")
    lines.append(f"\nmachine: {results['machine']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
