"""A parameter-server actor shared by several worker tasks.

Workers pull the current weights from the server, compute a gradient on their
shard of a least-squares problem, and push it back; the server applies each
update.  Run it with ``python examples/parameter_server.py``.
"""

import numpy as np

import farpool


@farpool.remote
class ParameterServer:
    def __init__(self, dim, learning_rate):
        self.weights = np.zeros(dim)
        self.learning_rate = learning_rate
        self.updates = 0

    def get_weights(self):
        return self.weights

    def apply_gradient(self, gradient):
        self.weights = self.weights - self.learning_rate * gradient
        self.updates += 1
        return self.updates


@farpool.remote
def worker(server, x, y, steps):
    """Pulls weights, pushes gradients of 0.5 * ||x w - y||^2 / n on its shard."""
    for _ in range(steps):
        w = farpool.get(server.get_weights.remote())
        gradient = x.T @ (x @ w - y) / len(y)
        farpool.get(server.apply_gradient.remote(gradient))
    return steps


if __name__ == "__main__":
    farpool.init(num_cpus=4)
    rng = np.random.default_rng(0)
    true_w = rng.normal(size=8)
    x = rng.normal(size=(4000, 8))
    y = x @ true_w + 0.01 * rng.normal(size=4000)

    server = ParameterServer.remote(8, learning_rate=0.1)
    shards = np.array_split(np.arange(len(y)), 4)
    done = farpool.get([worker.remote(server, x[s], y[s], 50) for s in shards])
    w = farpool.get(server.get_weights.remote())
    print(f"{sum(done)} updates from {len(shards)} workers; "
          f"distance to the true weights: {np.linalg.norm(w - true_w):.4f}")
    farpool.shutdown()
