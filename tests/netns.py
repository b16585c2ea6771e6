"""Separate hosts on one machine, made of Linux namespaces (needs root).

A ``HostBed`` builds N hosts for a test module and removes them afterwards,
even when the test failed::

        host h1 (10.231.0.1)      host h2 (10.231.0.2)     ...
        eth0 ----veth----+        eth0 ----veth----+
                         |                         |
                   [ h1  port     br0 bridge      h2 port ]   switch namespace

- Each host has its own network namespace (``lo`` up, ``eth0`` with its own
  address), and a *holder* process in new mount and pid namespaces with its own
  tmpfs on ``/tmp`` and ``/dev/shm``: hosts share no session directory, token
  file, ipc socket or object store segment, as separate machines would.  The rest
  of the file system (the venv, this checkout) is shared, as a site's NFS home is.
- The bridge lives in a switch namespace of its own, so the machine's own network
  gets no address, route or interface, and two test runs never collide.
- ``Host.popen``/``Host.run`` start commands on a host (``nsenter`` into its
  namespaces); ``Host.path`` reaches its private files from outside
  (``/proc/<holder>/root``).
- Teardown ends every process of a host at once: the holder is pid 1 of the
  host's pid namespace, and when it ends the kernel kills the rest.  The holder
  also ends when the process that made the bed dies (it reads a pipe from us),
  so a killed test run leaves no process behind; namespaces of dead runs are
  removed by the next bed (their names carry the pid that made them).
- ``Capture`` records every frame crossing the switch (an AF_PACKET socket in the
  switch namespace) and reassembles TCP streams, to check what is on the wire.

Run ``python tests/netns.py capture OUT`` only through ``Capture``.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time

from farpool._private.session import pid_alive

PREFIX = "fpt"          # network namespace names: fpt<pid>-<bed>-<host>
SUBNET = "10.231.0"     # only inside the bed's own switch: nothing else sees it
READY_TIMEOUT_S = 30


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def netns_list() -> list[str]:
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_stale() -> list[str]:
    """Remove the namespaces of test runs whose process is gone (a run killed mid-test)."""
    removed = []
    for name in netns_list():
        m = re.fullmatch(rf"{PREFIX}(\d+)-.*", name)
        if m and not pid_alive(int(m.group(1))):
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def host_env(extra: dict | None = None) -> dict:
    """Our environment for a process on a host, minus what names this machine's private
    paths (FARPOOL_TMPDIR, FARPOOL_SHM_PATH point into our /tmp, which hosts cannot see)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARPOOL_")
           and k not in ("TMPDIR", "PYTEST_CURRENT_TEST")}
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                 if p and p != src])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# pid 1 of a host: reap every child, exit when stdin closes.
_INIT = """
import os, signal, sys, threading
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
def lifeline():
    sys.stdin.read()
    os._exit(0)
threading.Thread(target=lifeline, daemon=True).start()
print("ready", flush=True)
while True:
    signal.sigwait([signal.SIGCHLD])
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
"""


def _kept_under_tmp() -> list[str]:
    """The directories right under /tmp that hold this interpreter, this checkout or the
    working directory: hosts get a private /tmp, but must still run our Python and code."""
    kept = []
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in (sys.prefix, os.path.realpath(sys.executable), here, os.getcwd()):
        parts = os.path.realpath(path).split(os.sep)
        if len(parts) > 2 and parts[1] == "tmp":
            top = os.sep.join(parts[:3])
            if top not in kept:
                kept.append(top)
    return kept


class Host:
    """One host of a bed: a network namespace with an address, and private /tmp and /dev/shm."""

    def __init__(self, name: str, netns: str, address: str):
        self.name = name
        self.netns = netns
        self.address = address
        self.holder: subprocess.Popen | None = None
        self.pid1: int | None = None  # the holder's shell: pid 1 of this host's pid namespace

    def start(self) -> None:
        # Mount and pid namespaces of its own, tmpfs on /tmp and /dev/shm, then pid 1 of the
        # host: it reaps orphans (daemons started on the host are reparented to it) and exits
        # at EOF on stdin (our pipe), when we close it or die; the kernel then kills the rest.
        # What lives under our /tmp and the host must still see (a checkout or venv there, as CI's
        # clone may be): bound to a staging tmpfs on /mnt, then back on top of the host's /tmp.
        keep = _kept_under_tmp()
        stage = [f"mkdir -p /mnt/{i} && mount --bind {shlex.quote(p)} /mnt/{i}" for i, p in enumerate(keep)]
        back = [f"mkdir -p {shlex.quote(p)} && mount --bind /mnt/{i} {shlex.quote(p)}" for i, p in enumerate(keep)]
        steps = ((["mount -t tmpfs tmpfs /mnt"] + stage if keep else [])
                 + ["mount -t tmpfs -o mode=1777 tmpfs /tmp"] + back
                 + ["mount -t tmpfs -o mode=1777 tmpfs /dev/shm", f"exec {sys.executable} -c {shlex.quote(_INIT)}"])
        script = " && ".join(steps)
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private",
             "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c", script],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        line = self.holder.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"host {self.name} did not start: {line}{self.holder.stderr.read()}")
        children = _children(self.holder.pid)
        if len(children) != 1:
            raise RuntimeError(f"host {self.name}: expected one child of unshare, found {children}")
        self.pid1 = children[0]

    def path(self, path: str) -> str:
        """Where this host's ``path`` is seen from outside it (its /tmp is private)."""
        return f"/proc/{self.pid1}/root{path}"

    def command(self, argv: list[str], cwd: str | None = None) -> list[str]:
        return ["nsenter", f"--target={self.pid1}", "--mount", "--net", "--pid",
                f"--wd={cwd or os.getcwd()}", "--", *argv]

    def popen(self, argv: list[str], env: dict | None = None, cwd: str | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv, cwd), env=host_env(env), **kw)

    def run(self, argv: list[str], env: dict | None = None, timeout: float = 60, check: bool = True,
            cwd: str | None = None, input: str | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(argv, cwd), env=host_env(env), capture_output=True, text=True,
                                timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"on {self.name}: {' '.join(argv)} exited with {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def python(self, code: str, env: dict | None = None, timeout: float = 60, check: bool = True,
               args: tuple = ()) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-c", code, *args], env=env, timeout=timeout, check=check)

    def processes(self) -> list[int]:
        """Pids (as seen from outside) of every process in this host's pid namespace but pid 1."""
        if self.pid1 is None:
            return []
        try:
            mine = os.readlink(f"/proc/{self.pid1}/ns/pid")
        except OSError:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.pid1:
                try:
                    if os.readlink(f"/proc/{entry}/ns/pid") == mine:
                        found.append(int(entry))
                except OSError:
                    pass
        return found

    def stop(self) -> None:
        if self.holder is None:
            return
        if self.pid1 is not None:
            try:
                os.kill(self.pid1, signal.SIGKILL)  # the kernel kills everything else on the host
            except ProcessLookupError:
                pass
        try:
            self.holder.stdin.close()
        except OSError:
            pass
        try:
            self.holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.holder.kill()
            self.holder.wait(timeout=30)
        for stream in (self.holder.stdout, self.holder.stderr):
            stream.close()
        self.holder = None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class HostBed:
    """N hosts on one switch.  Use as a context manager; ``close`` removes everything."""

    _count = 0

    def __init__(self, n: int):
        HostBed._count += 1
        self.tag = f"{PREFIX}{os.getpid()}-{HostBed._count}"
        self.switch = f"{self.tag}-sw"
        self.hosts = [Host(f"h{i}", f"{self.tag}-h{i}", f"{SUBNET}.{i}") for i in range(1, n + 1)]
        self._made: list[str] = []

    def __enter__(self) -> "HostBed":
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        remove_stale()
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts:
            _ip("netns", "add", host.netns)
            self._made.append(host.netns)
            _ip("-n", self.switch, "link", "add", host.name, "type", "veth", "peer", "name", "eth0",
                "netns", host.netns)
            _ip("-n", self.switch, "link", "set", host.name, "master", "br0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
        self._wait_links()
        for host in self.hosts:
            host.start()

    def _wait_links(self) -> None:
        """Until every host's eth0 is up and every bridge port forwards (state, not time)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            ports = _ip("-n", self.switch, "-d", "link", "show", "master", "br0").stdout
            forwarding = ports.count("state forwarding")
            up = all("state UP" in _ip("-n", h.netns, "link", "show", "eth0").stdout for h in self.hosts)
            if up and forwarding == len(self.hosts):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bed's links did not come up: {ports}")
            time.sleep(0.05)

    def close(self) -> None:
        for host in self.hosts:
            host.stop()
        for name in reversed(self._made):
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                try:  # only processes of our own namespaces (a capture, a holder left over)
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", name, check=False)
        self._made = []

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]


# ------------------------------------------------------------------------------- capture
class Capture:
    """Every frame crossing the bed's switch, while running (a context manager).

    The frames are taken as each leaves the switch toward a host (one copy of each).
    After the ``with`` block: ``streams`` maps (src, sport, dst, dport) to the TCP
    payload reassembled in order, ``tcp_segments`` counts TCP segments with data
    between hosts, ``raw`` holds every frame as captured.
    """

    def __init__(self, bed: HostBed, out_path: str):
        self.bed = bed
        self.out_path = out_path
        self.proc: subprocess.Popen | None = None
        self.raw: list[bytes] = []
        self.streams: dict[tuple, bytes] = {}
        self.tcp_segments = 0

    def __enter__(self) -> "Capture":
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.bed.switch, sys.executable, os.path.abspath(__file__), "capture",
             self.out_path], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "capturing":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the capture did not start: {line!r}")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.proc.stdout.close()
        with open(self.out_path, "rb") as f:
            data = f.read()
        os.unlink(self.out_path)
        pos = 0
        while pos + 4 <= len(data):
            (n,) = struct.unpack_from("!I", data, pos)
            self.raw.append(data[pos + 4:pos + 4 + n])
            pos += 4 + n
        self._reassemble()

    def _reassemble(self) -> None:
        segments: dict[tuple, dict[int, bytes]] = {}
        for frame in self.raw:
            if len(frame) < 34 or frame[12:14] != b"\x08\x00":  # IPv4 only
                continue
            ip = frame[14:]
            ihl = (ip[0] & 0x0F) * 4
            total = struct.unpack_from("!H", ip, 2)[0]
            if ip[9] != 6:  # TCP
                continue
            src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
            tcp = ip[ihl:total]
            sport, dport, seq = struct.unpack_from("!HHI", tcp, 0)
            payload = tcp[(tcp[12] >> 4) * 4:]
            if payload:
                self.tcp_segments += 1
                segments.setdefault((src, sport, dst, dport), {})[seq] = payload
        for key, by_seq in segments.items():
            base = min(by_seq)  # short tests: sequence numbers do not wrap within them
            if max(by_seq) - base > 1 << 31:  # they did wrap: shift the low ones up
                by_seq = {(s + (1 << 32) if s - base < 1 << 31 and s < 1 << 31 else s): p for s, p in by_seq.items()}
                base = min(by_seq)
            size = max(s - base + len(p) for s, p in by_seq.items())
            stream = bytearray(size)
            for s, p in by_seq.items():
                stream[s - base:s - base + len(p)] = p
            self.streams[key] = bytes(stream)

    def contains(self, needle: bytes) -> list[str]:
        """Where ``needle`` was seen in plaintext: in a reassembled stream or any frame."""
        found = [f"{k[0]}:{k[1]} -> {k[2]}:{k[3]}" for k, s in self.streams.items() if needle in s]
        found += ["a raw frame" for f in self.raw if needle in f][:1]
        return found

    def bytes_between(self, a: str, b: str) -> int:
        return sum(len(s) for k, s in self.streams.items() if {k[0], k[2]} == {a, b})


class _Stop(Exception):
    pass


def _capture_main(out_path: str) -> int:
    """In the switch namespace: write every frame leaving the switch to out_path until SIGTERM."""
    ETH_P_ALL = 0x0003
    PACKET_OUTGOING = 4
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE (we are root)

    def stop(*_):
        raise _Stop()

    def keep(frame, addr):
        # Bridge ports only (not br0 itself), outgoing: each forwarded frame once.
        if addr[0] != "br0" and addr[2] == PACKET_OUTGOING:
            out.write(struct.pack("!I", len(frame)) + frame)

    with open(out_path, "wb") as out:
        signal.signal(signal.SIGTERM, stop)
        print("capturing", flush=True)
        try:
            while True:
                keep(*sock.recvfrom(1 << 18))  # veth passes GSO frames up to 64 KiB and more
        except _Stop:
            pass
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sock.setblocking(False)
        try:
            while True:  # what arrived before we were told to stop
                keep(*sock.recvfrom(1 << 18))
        except BlockingIOError:
            pass
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "capture":
        sys.exit(_capture_main(sys.argv[2]))
    sys.exit("usage: netns.py capture OUT (started by Capture)")
