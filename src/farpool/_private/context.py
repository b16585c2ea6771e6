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
        self.assigned_resources: dict[str, float] = {}  # what the task or actor holds
        self.capture_group: str | None = None  # its placement group, when that takes its children too
        self.actor_class = None       # in an actor's worker: its class (for current_actor)
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

    def get_assigned_resources(self) -> dict[str, float]:
        """The resources this task or actor holds, e.g. ``{"CPU": 1.0, "GPU": 0.5}`` ({} in a driver;
        an actor without explicit ``num_cpus`` holds none while it lives)."""
        return dict(self.assigned_resources)

    def get_accelerator_ids(self) -> dict[str, list[str]]:
        """The accelerator ids this task or actor may use, as Ray gives them: ``{"GPU": ["0", "1"]}``."""
        return {"GPU": [str(i) for i in self.gpu_ids]}

    @property
    def current_actor(self):
        """The handle of the actor this code runs in (RuntimeError outside an actor).

        It does not count as a handle: it keeps the actor alive only while others do."""
        if self.actor_id is None:
            raise RuntimeError("current_actor is only available inside an actor's methods (this runs in a "
                               f"{'task' if self.task_id else 'driver'}); pass a handle explicitly instead")
        if actor_handle_factory is None:
            raise RuntimeError("current_actor needs farpool.actor; read it through farpool.get_runtime_context()")
        return actor_handle_factory(self.actor_id, self.actor_class)

    def __repr__(self):
        return (f"RuntimeContext(node_id={self.node_id!r}, worker_id={self.worker_id!r}, "
                f"task_id={self.task_id!r}, actor_id={self.actor_id!r})")


context = RuntimeContext()
# Set by farpool.actor (a public module this leaf may not import): (actor_id, class) -> handle.
actor_handle_factory = None
# Set in a worker process: what a nested client needs to join its cluster.
worker_config: dict | None = None
