"""`farpool k8s render`, the pods' entrypoint and their readiness probe.

Kubernetes cannot run here: the rendered manifests are validated against its
schemas offline (`kubernetes-validate`, in the test extra), and the entrypoint
and probe the manifests run are run as scripts on loopback, with the
environment the manifests give each pod (the cluster-only values replaced).
"""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import kubernetes_validate
import psutil
import pytest
import yaml

from farpool._private.launchers import k8s
from farpool.k8s_entrypoint import start_args

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from farpool_testing import wait_until  # noqa: E402

pytestmark = pytest.mark.cluster

K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
RUN_TIMEOUT_S = 60


def _render(*args):
    out = subprocess.run([sys.executable, "-m", "farpool", "k8s", "render", *args], capture_output=True,
                         text=True, timeout=RUN_TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    return out


def _containers(doc):
    return doc["spec"]["template"]["spec"]["containers"] if doc["kind"] == "Deployment" else []


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("flags", [[], ["--workers", "4", "--num-cpus", "2", "--memory", "8Gi", "--num-gpus", "1",
                                        "--namespace", "science", "--name", "lab", "--image", "reg.io/fp:1"]])
def test_every_manifest_is_valid_kubernetes(flags, version):
    docs = list(yaml.safe_load_all(_render(*flags).stdout))
    assert [d["kind"] for d in docs] == ["Secret", "Deployment", "Service", "Deployment"]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises, naming the field, when not


def test_the_token_comes_from_the_secret_and_never_from_a_command_line(tmp_path):
    out_file = tmp_path / "cluster.yaml"
    result = _render("--workers", "2", "-o", str(out_file))
    assert result.stdout == ""
    assert "keep them private" in result.stderr
    assert os.stat(out_file).st_mode & 0o777 == 0o600
    docs = list(yaml.safe_load_all(out_file.read_text()))
    secret = docs[0]
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) >= 24
    containers = [c for d in docs for c in _containers(d)]
    assert len(containers) == 2
    for c in containers:
        assert token not in json.dumps(c)  # nowhere in a pod spec: args, command, env values, probes
        token_env = [e for e in c["env"] if e["name"] == "FARPOOL_TOKEN"]
        assert token_env == [{"name": "FARPOOL_TOKEN",
                              "valueFrom": {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "token"}}}]
        pod_ip = [e for e in c["env"] if e["name"] == "FARPOOL_POD_IP"]
        assert pod_ip[0]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert c["readinessProbe"]["exec"]["command"] == ["python", "-m", "farpool.k8s_probe"]
    # each render makes a new token
    again = list(yaml.safe_load_all(_render().stdout))
    assert again[0]["data"]["token"] != secret["data"]["token"]


def test_resources_and_replicas_follow_the_flags():
    docs = list(yaml.safe_load_all(_render("--workers", "5", "--cpus", "3", "--memory", "2Gi",
                                           "--gpus", "2").stdout))
    head, service, workers = docs[1], docs[2], docs[3]
    assert (head["spec"]["replicas"], workers["spec"]["replicas"]) == (1, 5)
    for dep in (head, workers):
        c = _containers(dep)[0]
        assert c["resources"] == {"requests": {"cpu": "3", "memory": "2Gi", "nvidia.com/gpu": "2"},
                                  "limits": {"memory": "2Gi", "nvidia.com/gpu": "2"}}
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["FARPOOL_NUM_CPUS"] == "3" and env["FARPOOL_NUM_GPUS"] == "2"
        assert int(env["FARPOOL_OBJECT_STORE_MEMORY"]) == int(2 * 2 ** 30 * k8s.OBJECT_STORE_SHARE)
    assert service["spec"]["ports"] == [{"name": "head", "port": k8s.HEAD_PORT, "targetPort": k8s.HEAD_PORT}]
    assert service["spec"]["selector"] == head["spec"]["template"]["metadata"]["labels"]
    worker_env = {e["name"]: e.get("value") for e in _containers(workers)[0]["env"]}
    assert worker_env["FARPOOL_HEAD_HOST"] == f"{service['metadata']['name']}.default.svc"


def test_the_yaml_reads_back_as_the_objects():
    docs = k8s.render("x", "img", 2, "tok", num_cpus=1.5, memory="1G")
    assert list(yaml.safe_load_all(k8s.to_yaml(docs))) == docs


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "Bad_Name"}, "--name must be a DNS label"),
    ({"workers": -1}, "--workers must be >= 0, got -1"),
    ({"num_cpus": 0}, "--num-cpus must be > 0, got 0"),
    ({"num_gpus": 0.5}, "--num-gpus must be a whole number >= 0"),
    ({"memory": "lots"}, "--memory must be a Kubernetes quantity such as 4Gi"),
])
def test_wrong_flags_say_what_is_expected(kwargs, message):
    args = dict(name="farpool", image="img", workers=1, token="t")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        k8s.render(**args)


def test_the_entrypoint_needs_its_role_and_settings():
    with pytest.raises(ValueError, match="FARPOOL_ROLE must be 'head' or 'worker', got 'boss'"):
        start_args({"FARPOOL_ROLE": "boss"})
    with pytest.raises(ValueError, match="FARPOOL_TOKEN, FARPOOL_HEAD_HOST not set in this worker pod"):
        start_args({"FARPOOL_ROLE": "worker", "FARPOOL_POD_IP": "10.1.2.3", "FARPOOL_HEAD_PORT": "6380",
                    "FARPOOL_NODE_PORT": "6381"})


# --- the entrypoint and the probe, run as the pods run them ---

def _pod_env(doc, secret, **overrides):
    """A pod's environment as Kubernetes would build it from the manifest, plus ``overrides``."""
    env = {}
    for e in _containers(doc)[0]["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            env[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        else:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            env[e["name"]] = "127.0.0.1"  # this machine's loopback plays the pod IP
    env.update(overrides)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(module, env, **kw):
    return subprocess.run([sys.executable, "-m", module], env=dict(os.environ, **env), capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S, **kw)


class Pod:
    """``python -m farpool.k8s_entrypoint`` in its own tmp root, as a pod's container runs it."""

    def __init__(self, env, root):
        os.makedirs(root, mode=0o700, exist_ok=True)
        self.env = dict(env, FARPOOL_TMPDIR=root)
        self.proc = subprocess.Popen([sys.executable, "-m", "farpool.k8s_entrypoint"],
                                     env=dict(os.environ, **self.env), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.family = []

    def wait_started(self, marker):
        lines = []
        for line in self.proc.stdout:  # `farpool start` prints this once its processes are up
            lines.append(line)
            if line.startswith(marker):
                self.family = psutil.Process(self.proc.pid).children(recursive=True)
                return
        raise AssertionError(f"the pod's entrypoint exited: {''.join(lines)}{self.proc.stderr.read()}")

    def probe(self):
        return _run("farpool.k8s_probe", self.env)

    def stop(self):
        """SIGTERM, as Kubernetes stops a pod; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # hang guard
            self.proc.kill()
            self.proc.communicate()
        gone, alive = psutil.wait_procs(self.family, timeout=RUN_TIMEOUT_S)
        assert not alive, f"left running after the pod stopped: {alive}"
        return self.proc.returncode


def test_head_and_worker_pods_run_a_task_and_are_ready_only_while_up(tmp_root):
    docs = k8s.render("t", "img", 1, "unused", num_cpus=1)
    docs[0]["data"]["token"] = base64.b64encode(b"k8s-test-token-0123456789abcdef").decode()
    secret, head_dep, worker_dep = docs[0], docs[1], docs[3]
    port = _free_port()
    local = {"FARPOOL_HEAD_HOST": "127.0.0.1", "FARPOOL_HEAD_PORT": str(port), "FARPOOL_NODE_PORT": "0",
             "FARPOOL_LISTEN_HOST": "127.0.0.1"}  # what only a Kubernetes cluster has (DNS, own IPs)
    head_env = _pod_env(head_dep, secret, **local)
    worker_env = _pod_env(worker_dep, secret, FARPOOL_RESOURCES='{"pod_worker": 1}', **local)
    assert head_env["FARPOOL_ROLE"] == "head" and worker_env["FARPOOL_ROLE"] == "worker"

    worker_root = os.path.join(tmp_root, "k8s-worker")
    before = _run("farpool.k8s_probe", dict(worker_env, FARPOOL_TMPDIR=worker_root))
    assert before.returncode == 1 and "nothing started yet" in before.stderr

    head = Pod(head_env, os.path.join(tmp_root, "k8s-head"))
    worker = None
    try:
        head.wait_started("farpool head started at")
        worker = Pod(worker_env, worker_root)
        worker.wait_started("farpool node")
        ready = worker.probe()
        assert ready.returncode == 0, ready.stderr
        wait_until(lambda: head.probe().returncode == 0, "the head pod's readiness probe to pass")

        code = ("import farpool, os\n"
                "farpool.init()\n"
                "@farpool.remote(resources={'pod_worker': 1})\n"
                "def f(x):\n"
                "    return os.environ['FARPOOL_TMPDIR'], x + 1\n"
                "print(farpool.get(f.remote(41), timeout=30))\n")
        driver = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=RUN_TIMEOUT_S,
                                env=dict(os.environ, FARPOOL_ADDRESS=f"127.0.0.1:{port}",
                                         FARPOOL_TOKEN=head_env["FARPOOL_TOKEN"]))
        assert driver.returncode == 0, driver.stderr
        assert driver.stdout.strip() == str((worker_root, 42))
    finally:
        codes = [pod.stop() for pod in (worker, head) if pod is not None]
    assert codes == [0, 0]
    after = _run("farpool.k8s_probe", dict(worker_env, FARPOOL_TMPDIR=worker_root))
    assert after.returncode == 1, after.stderr
    for root in (worker_root, os.path.join(tmp_root, "k8s-head")):
        assert not [d for d in os.listdir(root) if d.startswith("s-")]
        shutil.rmtree(root)
