"""What this process knows about where it runs: the task context and, in a worker, how to join.

A leaf module (it imports nothing of farpool), so that the client, the worker
and the runtime can all read it without importing each other.  Written by the
worker's main thread as it sets up a job or starts a task; read by any thread.
"""

from __future__ import annotations


class RuntimeContext:
    """What ``farpool.get_runtime_context()`` reports inside a task."""

    def __init__(self):
        self.node_id = None
        self.worker_id = None
        self.task_id = None
        self.task_name = None
        self.actor_id = None
        self.namespace = None
        self.job_id = None
        self.gpu_ids: list[int] = []
        self.exit_requested = False  # an actor called exit_actor(): end after this call
        self.in_user_code = False    # a cancel may interrupt only the task's own code
        self.cancel_pending = False

    def get_node_id(self):
        return self.node_id

    def get_worker_id(self):
        return self.worker_id

    def get_task_id(self):
        return self.task_id

    def get_namespace(self):
        return self.namespace

    def get_actor_id(self):
        return self.actor_id

    def get_job_id(self):
        return self.job_id

    def __repr__(self):
        return (f"RuntimeContext(node_id={self.node_id!r}, worker_id={self.worker_id!r}, "
                f"task_id={self.task_id!r}, actor_id={self.actor_id!r})")


context = RuntimeContext()
# Set in a worker process: what a nested client needs to join its cluster.
worker_config: dict | None = None
