"""The benchmark harness runs end to end (--quick): a smoke test, no timing assertions."""

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_quick_benchmark_runs_farpool_and_stdlib_peers(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "harness.py"), "--quick", "--only",
         "farpool,mp_pool,ppe", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "farpool" in json.dumps(data)
    assert "ratio" in result.stdout.lower() or "farpool/" in result.stdout


def test_python_dash_m_farpool_microbenchmark_runs_every_workload(tmp_path):
    """Run as ``python -m farpool``, the driver's main module is farpool.__main__; workers
    import it as __mp_main__ and must not run the command again (they did, and every task
    died of its SystemExit)."""
    result = subprocess.run([sys.executable, "-m", "farpool", "microbenchmark", "--quick"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tasks/s" in result.stdout and "n/a" not in result.stdout, result.stdout[-3000:]
