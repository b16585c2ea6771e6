"""``mpirun -n N python -m farpool.mpi [options] SCRIPT [ARGS...]``: run SCRIPT on a cluster of MPI ranks.

Rank 0 starts the head and runs SCRIPT as ``__main__`` (its ``farpool.init()``
joins the cluster); every rank, rank 0 included, runs a node agent holding one
``rank<N>`` resource, so ``@farpool.remote(resources={"rank2": 1})`` pins a
task to rank 2's node.  When SCRIPT ends, every rank stops its part and the
job exits with SCRIPT's exit code.  Needs ``mpi4py`` (``pip install mpi4py``).
See ``farpool._private.launchers.mpi`` for how the ranks meet.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m farpool.mpi",
        description="Run SCRIPT on a farpool cluster made of this MPI job's ranks: rank 0 is the head and "
                    "runs SCRIPT, every rank is a node agent with the resource rank<N>.")
    parser.add_argument("--host", default=None,
                        help="address rank 0's head listens on (default: loopback when every rank is on "
                             "this machine, else the local address on the route to the other machines)")
    parser.add_argument("--num-cpus", type=float, default=None, help="logical CPUs of each rank's node")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs of each rank's node")
    parser.add_argument("--resources", default="{}", help="custom resources of each rank's node, as JSON")
    parser.add_argument("script", help="the Python script rank 0 runs as __main__")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    opts = parser.parse_args(argv)
    try:
        resources = json.loads(opts.resources)
    except ValueError as exc:
        parser.error(f"--resources must be JSON such as '{{\"ssd\": 1}}', got {opts.resources!r}: {exc}")
    try:
        from mpi4py import MPI
    except ImportError:
        print("python -m farpool.mpi needs mpi4py and an MPI library: pip install mpi4py mpich "
              "(or mpi4py built against your site's MPI, whose mpirun then starts this)", file=sys.stderr)
        return 1
    from farpool._private.launchers import mpi
    return mpi.run(MPI.COMM_WORLD, mpi.Options(script=opts.script, script_args=opts.args, host=opts.host,
                                               num_cpus=opts.num_cpus, num_gpus=opts.num_gpus,
                                               resources=resources))


if __name__ == "__main__":
    sys.exit(main())
