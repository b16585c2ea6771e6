"""farpool: spread Python over every core of many machines.

The public API only; nothing starts at import.  See API.md in the project for
the contract.
"""

import importlib

# Re-exports, loaded on first use: runtime processes import farpool._private.*
# without paying for the client and API modules.
_EXPORTS = {
    "exceptions": "farpool.exceptions", "observe": "farpool.observe",
    "ObjectRef": "farpool._private.object_ref", "ObjectRefGenerator": "farpool._generator",
    "DistributedExecutor": "farpool.executor", "Pool": "farpool.pool",
    **{name: "farpool.actor" for name in ("ActorClass", "ActorHandle", "get_actor", "kill", "method")},
    **{name: "farpool.api" for name in (
        "NodeAffinity", "PlacementGroupScheduling", "available_resources", "cancel", "cluster_resources", "get", "get_gpu_ids",
        "get_runtime_context", "init", "is_initialized", "nodes", "put", "remote", "shutdown", "wait")},
    **{name: "farpool.observe" for name in ("progress", "status", "timeline")},
    **{name: "farpool.exceptions" for name in (
        "ActorDiedError", "AuthenticationError", "FarpoolError", "GetTimeoutError", "InfeasibleError",
        "NodeDiedError", "ObjectLostError", "ObjectStoreFullError", "OwnerDiedError",
        "TaskCancelledError", "TaskError", "WorkerCrashedError")},
}


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'farpool' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if name in ("exceptions", "observe") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


from farpool._version import __version__  # noqa: E402,F401

__all__ = [
    "ActorClass", "ActorHandle", "get_actor", "kill", "method", "DistributedExecutor", "Pool",
    "ActorDiedError", "AuthenticationError", "FarpoolError", "GetTimeoutError", "InfeasibleError",
    "NodeAffinity", "NodeDiedError", "ObjectLostError", "ObjectRef", "ObjectRefGenerator", "ObjectStoreFullError",
    "OwnerDiedError", "PlacementGroupScheduling", "TaskCancelledError", "TaskError", "WorkerCrashedError", "available_resources",
    "cancel", "cluster_resources", "exceptions", "get", "get_gpu_ids", "get_runtime_context", "init",
    "is_initialized", "nodes", "observe", "progress", "put", "remote", "shutdown", "status", "timeline", "wait",
]
