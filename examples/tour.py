"""A short tour of farpool's native API on a private cluster on this machine.

Run it with ``python examples/tour.py``.  ``farpool.init()`` with no address
starts a head, a node agent and its worker processes; they end with this
script.
"""

import time

import numpy as np

import farpool


@farpool.remote
def square(x):
    return x * x


@farpool.remote
def slow_square(x):
    time.sleep(1)
    return x * x


@farpool.remote(num_returns=2)
def make_matrices(n, seed):
    rng = np.random.default_rng(seed)
    return rng.random((n, n)), rng.random((n, n))


@farpool.remote
def multiply(a, b):
    return a @ b


@farpool.remote(num_gpus=0.5)
def on_half_a_gpu(i):
    """Two of these share one GPU; each sees its device in CUDA_VISIBLE_DEVICES."""
    import os
    return i, farpool.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")


@farpool.remote
class Counter:
    """An actor: a stateful worker; its method calls run one at a time, in order."""

    def __init__(self):
        self.n = 0

    def inc(self):
        self.n += 1
        return self.n


@farpool.remote(resources={"fast_disk": 1})
def uses_fast_disk():
    return "ran where the custom resource lives"


@farpool.remote
def fails():
    raise ValueError("something went wrong inside a task")


if __name__ == "__main__":
    # Logical resources: declare 4 CPUs, 1 GPU and a custom resource on this machine
    # (logical amounts: no GPU is needed to run this).
    farpool.init(num_cpus=4, num_gpus=1, resources={"fast_disk": 1})
    print("cluster resources:", farpool.cluster_resources())

    # Tasks run in parallel worker processes; .remote() returns an ObjectRef at once.
    refs = [square.remote(i) for i in range(10)]
    print("squares:", farpool.get(refs))

    # Four one-second tasks on four (logical) CPUs take about one second.
    start = time.perf_counter()
    farpool.get([slow_square.remote(i) for i in range(4)])
    print(f"four 1-second tasks took {time.perf_counter() - start:.2f} s")

    # Refs chain tasks: the product is computed from two matrices made by another task.
    a, b = make_matrices.remote(200, seed=0)
    product = farpool.get(multiply.remote(a, b))
    print("matrix product shape:", product.shape, "trace:", round(float(np.trace(product)), 3))

    # put() stores a value once; many tasks can take the same ref.
    big = farpool.put(np.arange(1_000_000))
    print("sum via a put ref:", farpool.get(farpool.remote(lambda arr: int(arr.sum())).remote(big)))

    # wait() returns what is ready, in the order given.
    refs = [slow_square.remote(i) for i in range(4)] + [square.remote(7)]
    ready, not_ready = farpool.wait(refs, num_returns=1, timeout=5)
    print(f"{len(ready)} ready first, {len(not_ready)} still running")

    print(farpool.get(uses_fast_disk.remote()))

    # Fractional GPUs: two tasks of 0.5 GPU share GPU 0.
    print("half-GPU tasks (i, gpu ids, CUDA_VISIBLE_DEVICES):",
          farpool.get([on_half_a_gpu.remote(i) for i in range(2)]))

    # An actor keeps state between calls.
    counter = Counter.remote()
    refs = [counter.inc.remote() for _ in range(5)]
    print("counter actor:", farpool.get(refs))

    # A remote exception is a TaskError that is also the original exception type.
    try:
        farpool.get(fails.remote())
    except ValueError as err:
        print("caught the remote ValueError:", err.args[0])

    farpool.shutdown()
