"""Swap one import: a ProcessPoolExecutor program spread over a farpool cluster.

The program below is ordinary ``concurrent.futures`` code: it counts the primes
below a bound in blocks, with ``map`` for the bulk and ``submit`` +
``as_completed`` for a few extra jobs.  The only farpool-specific lines are the
import and the resource hint in ``ex.options(num_cpus=2)`` (a task that holds
two CPUs; ``ex.options(num_gpus=1)`` asks for a GPU the same way).

Run it with ``python examples/executor_swap.py``: it starts a private
embedded cluster on this machine, or joins the one ``farpool start`` made when
``FARPOOL_ADDRESS`` is set (``DistributedExecutor(address="auto")`` does it in
code).  Remove the import line and uncomment the stdlib one to compare.
"""

import math
import time
from concurrent.futures import as_completed

# from concurrent.futures import ProcessPoolExecutor
from farpool import DistributedExecutor as ProcessPoolExecutor

BLOCK = 20_000


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    for d in range(3, math.isqrt(n) + 1, 2):
        if n % d == 0:
            return False
    return True


def primes_in_block(start: int) -> int:
    return sum(1 for n in range(start, start + BLOCK) if is_prime(n))


def twin_primes_below(limit: int) -> int:
    return sum(1 for n in range(3, limit - 2, 2) if is_prime(n) and is_prime(n + 2))


def main() -> None:
    limit = 400_000
    started = time.perf_counter()
    with ProcessPoolExecutor() as ex:
        # The bulk: one task per block (chunksize batches several blocks into one task).
        total = sum(ex.map(primes_in_block, range(0, limit, BLOCK), chunksize=2))
        # A few heavier jobs, each holding two CPUs, collected as they finish.
        futures = {ex.options(num_cpus=2).submit(twin_primes_below, n): n for n in (20_000, 50_000)}
        twins = {futures[f]: f.result() for f in as_completed(futures)}
    elapsed = time.perf_counter() - started
    print(f"{total} primes below {limit:,} in {elapsed:.2f} s")
    for n in sorted(twins):
        print(f"{twins[n]} twin-prime pairs below {n:,}")


if __name__ == "__main__":
    main()
