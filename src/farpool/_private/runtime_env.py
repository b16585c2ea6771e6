"""A task's or actor's ``runtime_env``: checked, made canonical, its code packaged and uploaded.

Tasks with a runtime_env get workers of their own, keyed by the env's canonical
JSON (see ``key``).  ``working_dir`` and ``py_modules`` are zipped by content
hash and uploaded to the head's KV once per driver process; a worker unpacks
them on its node (worker.py ``_unpack``).  Called from user threads.
"""

from __future__ import annotations

import json
import os

from farpool._private import runtime

RUNTIME_ENV_KEYS = ("env_vars", "working_dir", "py_modules")


def check(runtime_env: dict | None, what: str = "runtime_env") -> None:
    """Validate a runtime_env without packaging anything (nothing starts, nothing is uploaded)."""
    if not runtime_env:
        return
    if not isinstance(runtime_env, dict):
        raise TypeError(f"`{what}` must be a dict, got {type(runtime_env).__name__}")
    unknown = sorted(set(runtime_env) - set(RUNTIME_ENV_KEYS))
    installs = [k for k in unknown if k in ("pip", "conda", "uv", "container", "image_uri")]
    if installs:
        raise ValueError(f"{what}[{installs[0]!r}] is not supported by farpool: it does not install "
                         "packages per task; install them on every node first (farpool up's `setup:` commands, "
                         "or your image), and ship your own code with working_dir or py_modules")
    if unknown:
        raise ValueError(f"unknown {what} field(s) {', '.join(unknown)}; supported: "
                         f"{', '.join(RUNTIME_ENV_KEYS)}")
    env_vars = runtime_env.get("env_vars") or {}
    if not isinstance(env_vars, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in env_vars.items()):
        raise TypeError(f"{what}['env_vars'] must be a dict of str -> str, got {env_vars!r}")
    paths = [("working_dir", runtime_env.get("working_dir"))] if runtime_env.get("working_dir") else []
    if runtime_env.get("py_modules"):
        if not isinstance(runtime_env["py_modules"], (list, tuple)):
            raise TypeError(f"{what}['py_modules'] must be a list of paths, got {runtime_env['py_modules']!r}")
        paths += [("py_modules", p) for p in runtime_env["py_modules"]]
    for field_name, path in paths:
        if not (isinstance(path, str) and (path.startswith("pkg:") or os.path.exists(path))):
            raise ValueError(f"{what}['{field_name}']: {path!r} does not exist on this machine")


def canonical(runtime_env: dict | None) -> dict | None:
    """The env with its code packaged ("pkg:<hash>:<name>", uploaded to the head once)."""
    if not runtime_env:
        return None
    check(runtime_env)
    out = dict(runtime_env)
    # Code travels with the task: working_dir and py_modules are packaged (by content
    # hash, uploaded once to the head) and unpacked on whichever node runs the task.
    if out.get("working_dir"):
        out["working_dir"] = package(out["working_dir"], "working_dir")
    if out.get("py_modules"):
        out["py_modules"] = [package(p, "py_modules") for p in out["py_modules"]]
    if not out.get("env_vars"):
        out.pop("env_vars", None)
    return out


def merge(job: dict | None, task: dict | None) -> dict | None:
    """The job's runtime_env (init) with a task's or actor's on top: env_vars merged, the task's
    winning on conflicts; the task's working_dir replaces the job's; py_modules: the job's, then
    the task's."""
    if not job:
        return task or None
    if not task:
        return job
    out = dict(job)
    if task.get("env_vars"):
        out["env_vars"] = {**(job.get("env_vars") or {}), **task["env_vars"]}
    if task.get("working_dir"):
        out["working_dir"] = task["working_dir"]
    if task.get("py_modules"):
        out["py_modules"] = list(job.get("py_modules") or []) + [
            m for m in task["py_modules"] if m not in (job.get("py_modules") or [])]
    return out


_job_key: tuple = (None, None)  # (the job's env, its key)


def key(runtime_env: dict | None) -> str | None:
    """Tasks with a runtime_env get workers of their own, keyed by the env's canonical form
    (the job's, from init(runtime_env=...), with this one on top)."""
    global _job_key
    job = runtime.job_runtime_env()
    if not runtime_env:
        if not job:
            return None
        if _job_key[0] is not job:  # (once per job, not per task)
            _job_key = (job, "runtime_env:" + json.dumps(job, sort_keys=True))
        return _job_key[1]
    env = merge(job, canonical(runtime_env))
    return "runtime_env:" + json.dumps(env, sort_keys=True)


_PACKAGES: dict = {}  # (path, newest mtime) -> package key, per driver process
# Packages larger than this are refused: runtime_env is for code, not data (put() data).
MAX_PACKAGE_BYTES = 100 * 1024 * 1024


def package(path: str, what: str) -> str:
    """Zip a directory or .py file, upload it to the head once; returns "pkg:<hash>:<name>"."""
    import hashlib
    import io
    import zipfile
    if isinstance(path, str) and path.startswith("pkg:"):
        return path  # packaged already (the job's env, as a worker got it)
    if not isinstance(path, str) or not os.path.exists(path):
        raise ValueError(f"runtime_env['{what}']: {path!r} does not exist on this machine")
    path = os.path.abspath(path)
    files = []
    if os.path.isdir(path):
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", ".git"))
            for name in sorted(names):
                if not name.endswith(".pyc"):
                    full = os.path.join(root, name)
                    files.append((full, os.path.relpath(full, os.path.dirname(path) if what == "py_modules"
                                                        else path)))
    else:
        files.append((path, os.path.basename(path)))
    stamp = (path, max((os.path.getmtime(f) for f, _ in files), default=0), len(files))
    key = _PACKAGES.get(stamp)
    if key is not None:
        return key
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for full, arc in files:
            info = zipfile.ZipInfo(arc, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (os.stat(full).st_mode & 0o777) << 16
            with open(full, "rb") as f:
                zf.writestr(info, f.read())
    data = buf.getvalue()
    if len(data) > MAX_PACKAGE_BYTES:
        raise ValueError(f"runtime_env['{what}'] {path} packs to {len(data) / 1e6:.0f} MB, over the "
                         f"{MAX_PACKAGE_BYTES / 1e6:.0f} MB limit: ship code here and data with farpool.put()")
    key = f"pkg:{hashlib.sha256(data).hexdigest()[:32]}:{os.path.basename(path)}"
    runtime.client().head_request("KVPut", (key, data))
    _PACKAGES[stamp] = key
    return key


def pool_key(pool: str | None, runtime_env: dict | None) -> str | None:
    """The key of the workers a task needs: its pool's (facades) and its runtime_env's (with
    the job's), or None."""
    env = key(runtime_env)
    return "|".join(k for k in (pool, env) if k) or None
