"""``farpool k8s render``: Kubernetes manifests for a farpool cluster (pure: no cluster, no I/O).

Run by the CLI in the user's process.  What it renders, applied with
``kubectl apply -f``::

    Secret NAME-token        the cluster token (made here, fresh each render)
    Deployment NAME-head     1 pod: `farpool start --head` (the head + a node agent)
    Service NAME-head        port HEAD_PORT -> the head pod (workers and drivers join here)
    Deployment NAME-worker   N pods: `farpool start --address NAME-head.NS.svc:HEAD_PORT`

Every pod runs ``python -m farpool.k8s_entrypoint`` (the image's ENTRYPOINT, see
the repository's Dockerfile), configured by environment variables only: its
role, the head's host and ports, its pod IP (downward API: what it registers,
so drivers and other nodes reach it directly) and ``FARPOOL_TOKEN`` from the
Secret (never in args).  A readiness probe runs ``python -m farpool.k8s_probe``
in the pod: ready once the pod's node is alive in the head's node table.
"""

from __future__ import annotations

import base64
import json
import re

# Kubernetes declares ports, so they are fixed here (a bare `farpool start` picks free ones).
HEAD_PORT = 6380
NODE_PORT = 6381
# Share of a pod's memory given to its object store (the rest for tasks and the runtime);
# /dev/shm is a memory-backed emptyDir of that size (Docker's default /dev/shm is 64 MB).
OBJECT_STORE_SHARE = 0.3
# Readiness probe timing, seconds: each probe joins the cluster briefly as a driver (about 1 s).
PROBE_PERIOD_S = 10
PROBE_TIMEOUT_S = 10
GPU_RESOURCE = "nvidia.com/gpu"

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|K|M|G|T|k)?$")
_UNITS = {None: 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ("4Gi", "512Mi", "1G", "1000000") in bytes."""
    match = _QUANTITY.match(str(quantity).strip())
    if not match:
        raise ValueError(f"--memory must be a Kubernetes quantity such as 4Gi, 512Mi or 2G, got {quantity!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _check(name: str, namespace: str, workers: int, num_cpus, num_gpus) -> None:
    for what, value in (("--name", name), ("--namespace", namespace)):
        if not _NAME.match(value) or len(value) > 40:
            raise ValueError(f"{what} must be a DNS label (lowercase letters, digits and '-', at most 40 "
                             f"characters, starting and ending with a letter or digit), got {value!r}")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if num_cpus is not None and num_cpus <= 0:
        raise ValueError(f"--num-cpus must be > 0, got {num_cpus:g}")
    if num_gpus is not None and (num_gpus < 0 or num_gpus != int(num_gpus)):
        raise ValueError(f"--num-gpus must be a whole number >= 0 (Kubernetes gives whole GPUs), got {num_gpus:g}")


def render(name: str, image: str, workers: int, token: str, namespace: str = "default",
           num_cpus: float | None = None, memory: str | None = None, num_gpus: float | None = None) -> list[dict]:
    """The manifests, as objects in apply order; ValueError names a wrong flag."""
    _check(name, namespace, workers, num_cpus, num_gpus)
    head_host = f"{name}-head.{namespace}.svc"
    secret = f"{name}-token"
    labels = {"app.kubernetes.io/name": "farpool", "app.kubernetes.io/instance": name}
    env_common = [
        {"name": "FARPOOL_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}}},
        {"name": "FARPOOL_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "FARPOOL_HEAD_HOST", "value": head_host},
        {"name": "FARPOOL_HEAD_PORT", "value": str(HEAD_PORT)},
        {"name": "FARPOOL_NODE_PORT", "value": str(NODE_PORT)},
    ]
    if num_cpus is not None:
        env_common.append({"name": "FARPOOL_NUM_CPUS", "value": f"{num_cpus:g}"})
    if num_gpus is not None:
        env_common.append({"name": "FARPOOL_NUM_GPUS", "value": f"{int(num_gpus)}"})
    shm = {"name": "dshm", "emptyDir": {"medium": "Memory"}}
    if memory is not None:
        store = int(memory_bytes(memory) * OBJECT_STORE_SHARE)
        env_common.append({"name": "FARPOOL_OBJECT_STORE_MEMORY", "value": str(store)})
        shm["emptyDir"]["sizeLimit"] = str(store)
    requests, limits = {}, {}
    if num_cpus is not None:
        requests["cpu"] = f"{num_cpus:g}"
    if memory is not None:
        requests["memory"] = limits["memory"] = str(memory)
    if num_gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(int(num_gpus))
    resources = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}

    def deployment(role: str, replicas: int) -> dict:
        pod_labels = dict(labels, **{"app.kubernetes.io/component": role})
        ports = [{"name": "node", "containerPort": NODE_PORT}]
        if role == "head":
            ports.insert(0, {"name": "head", "containerPort": HEAD_PORT})
        container = {
            "name": "farpool", "image": image,
            "env": [{"name": "FARPOOL_ROLE", "value": role}] + env_common,
            "ports": ports,
            "readinessProbe": {"exec": {"command": ["python", "-m", "farpool.k8s_probe"]},
                               "periodSeconds": PROBE_PERIOD_S, "timeoutSeconds": PROBE_TIMEOUT_S,
                               "failureThreshold": 3},
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        }
        if resources:
            container["resources"] = resources
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": f"{name}-{role}", "namespace": namespace, "labels": pod_labels},
                "spec": {"replicas": replicas, "selector": {"matchLabels": pod_labels},
                         "template": {"metadata": {"labels": pod_labels},
                                      "spec": {"containers": [container], "volumes": [shm],
                                               # SIGTERM, then `farpool start` stops its processes
                                               "terminationGracePeriodSeconds": 30}}}}

    head = deployment("head", 1)
    head_labels = head["metadata"]["labels"]
    return [
        {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
         "metadata": {"name": secret, "namespace": namespace, "labels": labels},
         "data": {"token": base64.b64encode(token.encode()).decode()}},
        head,
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": f"{name}-head", "namespace": namespace, "labels": head_labels},
         "spec": {"selector": head_labels,
                  "ports": [{"name": "head", "port": HEAD_PORT, "targetPort": HEAD_PORT}]}},
        deployment("worker", workers),
    ]


# --- a small YAML emitter (block style; strings double-quoted as JSON, which YAML reads) ---
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_./-]+$")


def _scalar(value) -> str:
    if value is True or value is False:
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, (dict, list)):  # empty
        return "{}" if isinstance(value, dict) else "[]"
    return json.dumps(str(value))


def _is_block(value) -> bool:
    return isinstance(value, (dict, list)) and bool(value)


def _lines(value, indent: int) -> list[str]:
    pad = " " * indent
    out = []
    if isinstance(value, dict):
        for key, item in value.items():
            key = key if _PLAIN_KEY.match(key) else json.dumps(key)
            if _is_block(item):
                out.append(f"{pad}{key}:")
                out.extend(_lines(item, indent + 2))
            else:
                out.append(f"{pad}{key}: {_scalar(item)}")
    else:
        for item in value:
            if _is_block(item):
                nested = _lines(item, indent + 2)
                out.append(f"{pad}- {nested[0][indent + 2:]}")
                out.extend(nested[1:])
            else:
                out.append(f"{pad}- {_scalar(item)}")
    return out


def to_yaml(docs: list[dict]) -> str:
    """The manifests as one multi-document YAML stream."""
    return "".join("---\n" + "\n".join(_lines(doc, 0)) + "\n" for doc in docs)
