"""Streaming generators: use each result as soon as the task has made it.

A generator task reads a large "file" chunk by chunk and yields one array per chunk;
the driver sums each chunk as it arrives and hands it to another task, long before the
producer is done.  ``max_pending_items=2`` keeps at most two unread chunks in the object
store, however far the producer could run ahead.  Run it with
``python examples/streaming.py``.
"""

import numpy as np

import farpool


@farpool.remote(max_pending_items=2)
def read_chunks(n_chunks, chunk_mb):
    rng = np.random.default_rng(0)
    for _ in range(n_chunks):
        yield rng.random(chunk_mb * 1024 * 1024 // 8)  # one chunk, as it is read


@farpool.remote
def summarize(chunk):
    return float(chunk.mean()), float(chunk.std())


def main():
    farpool.init(num_cpus=2)
    try:
        gen = read_chunks.remote(8, 16)
        stats = []
        for i, ref in enumerate(gen):  # each ref as soon as the producer yielded it
            chunk = farpool.get(ref)   # zero-copy, read-only view of the node's store
            print(f"chunk {i}: {chunk.nbytes // 2**20} MB, sum {chunk.sum():.1f}")
            stats.append(summarize.remote(ref))  # an item is an ordinary object: pass it on
            del chunk, ref
        means = [mean for mean, _ in farpool.get(stats)]
        print(f"{farpool.get(gen.completed())} chunks, mean of means {np.mean(means):.4f}")
    finally:
        farpool.shutdown()


if __name__ == "__main__":
    main()
