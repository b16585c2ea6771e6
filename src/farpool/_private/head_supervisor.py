"""The head's supervisor: restarts the head of a started cluster when it dies.

Runs as its own process (``python -m farpool._private.head_supervisor``, ``ps`` name
``farpool-headmon``), started by ``farpool start --head`` in place of the head; one
thread.  It starts the head (the arguments after ``--``) with a lifeline, so the head
never outlives it, waits for it to exit, and starts it again on the same session
directory, port, token and database (head_store.py), so the agents and drivers that
lose it reconnect to the new one by themselves::

    farpool start --head --> supervisor --spawn, lifeline--> head (epoch 1)
                                 |  <---------- exits ---------'
                                 |  wait RESTART_FIRST_S, doubling up to RESTART_MAX_S
                                 '--spawn--> head (epoch 2, on the same head.db) ...

Limit: a head that exits within STABLE_S of its start counts as a failed start; after
MAX_RESTARTS restarts in a row that failed so, the supervisor gives up at the next
failure: it writes why to ``<session>/head.gone``, and for HEAD_TIMEOUT_S (the time
agents and drivers wait for a head) it listens where the head did and answers
everything with ``Error("head-gone", why)``, so node agents exit and drivers fail at
once, saying why, instead of waiting out their timeout; then it exits with code 1.  A
head that ran STABLE_S or longer resets the count.
SIGTERM (``farpool stop``) or the end of its own lifeline (``--block``) stops the head
and then the supervisor.
"""

from __future__ import annotations

import argparse
import logging
import os
import selectors
import signal
import sys
import time

from farpool._private import protocol, session, transport

log = logging.getLogger("farpool.head_supervisor")

# Seconds before the first restart, doubled after each failed start up to RESTART_MAX_S.
# Shorter brings the head back sooner; longer spares a machine a head that cannot start.
RESTART_FIRST_S = 0.2
RESTART_MAX_S = 4.0
# Restarts in a row of a head that dies within STABLE_S of its start; the next such death
# and the supervisor gives up.  More rides out a longer bad spell; fewer tells everyone
# sooner.  With the waits above, the last restart comes about 6 s (plus the heads' start
# times) after the first death: within FARPOOL_HEAD_TIMEOUT_S (15 s), the time agents and
# drivers wait for a head.
MAX_RESTARTS = int(os.environ.get("FARPOOL_HEAD_MAX_RESTARTS", "5"))
STABLE_S = 10.0
# How long a stopped head may take to exit on SIGTERM before it is killed.
STOP_GRACE_S = 5.0
# How long agents and drivers wait for a head that went away (node.py, head_link.py):
# how long a supervisor that gave up answers in the head's place.
HEAD_TIMEOUT_S = float(os.environ.get("FARPOOL_HEAD_TIMEOUT_S", "15"))


def describe_exit(code: int) -> str:
    """``Popen.returncode`` in words."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    def __init__(self, session_dir: str, head_args: list[str], lifeline: bool):
        self.session_dir = session_dir
        self.head_args = head_args
        self.lifeline = lifeline
        self.orphaned = False  # our lifeline closed: the process that started us is gone
        self.stopping = False
        self.failures = 0
        self.restarts = 0
        self.proc = None
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "signal")
        if lifeline:
            self.sel.register(0, selectors.EVENT_READ, "lifeline")

    def _on_signal(self, *_):
        self.stopping = True

    def run(self) -> int:
        while not self.stopping:
            started = time.monotonic()
            self.proc = session.spawn("farpool._private.head", self.head_args, self.session_dir, "head.log",
                                      None, lifeline=True)
            pidfd = os.pidfd_open(self.proc.pid)
            self.sel.register(pidfd, selectors.EVENT_READ, "head")
            log.info("started the head (pid %d)%s", self.proc.pid,
                     f", restart {self.restarts}" if self.restarts else "")
            while not self.stopping and self.proc.poll() is None:
                self._wait(None)
            self.sel.unregister(pidfd)
            os.close(pidfd)
            if self.stopping:
                break
            ran = time.monotonic() - started
            if not self.restarts and not self._was_ready():
                # It never started (a port in use, a bad argument): nothing to restart.
                log.error("the head (pid %d) %s while starting; not restarting it",
                          self.proc.pid, describe_exit(self.proc.returncode))
                return 1
            how = describe_exit(self.proc.returncode)
            self.failures = 1 if ran >= STABLE_S else self.failures + 1
            if self.failures > MAX_RESTARTS:
                why = (f"the head (pid {self.proc.pid}) {how}; it failed {self.failures} times in a row, each "
                       f"within {STABLE_S:.0f} s of its start, so the supervisor gave up (MAX_RESTARTS="
                       f"{MAX_RESTARTS}); read why in {os.path.join(self.session_dir, 'head.log')}")
                log.error("%s", why)
                gone = os.path.join(self.session_dir, "head.gone")
                with open(gone + ".tmp", "w") as f:  # whole at once: readers never see it empty
                    f.write(why + "\n")
                os.replace(gone + ".tmp", gone)
                self._answer_gone(why)
                return 1
            delay = min(RESTART_MAX_S, RESTART_FIRST_S * 2 ** (self.failures - 1))
            log.warning("the head (pid %d) %s after %.1f s; restarting it in %.1f s (failed start %d of %d "
                        "allowed)", self.proc.pid, how, ran, delay, self.failures, MAX_RESTARTS)
            end = time.monotonic() + delay
            while not self.stopping and time.monotonic() < end:
                self._wait(end - time.monotonic())
            self.restarts += 1
        self._stop_head()
        if self.orphaned:  # whoever started us is gone and cannot clean up; the head wrote until it exited
            session.remove_session(self.session_dir)
        return 0

    def _answer_gone(self, why: str) -> None:
        """Listen where the head did and answer every message ``Error("head-gone", why)`` for
        HEAD_TIMEOUT_S, or until stopped: whoever reconnects learns at once that it is over."""
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--host", default=None)
        head, _ = parser.parse_known_args(self.head_args)
        sockets = []
        zap = None
        try:
            ipc = transport.router()
            ipc.bind(session.ipc(self.session_dir, "head"))
            sockets.append(ipc)
            with open(os.path.join(self.session_dir, "head.port")) as f:
                port = int(f.read().strip() or 0)
            if head.host and port:
                token = os.environ.get("FARPOOL_TOKEN", "")
                zap = transport.ZapHandler(token)
                sockets.append(zap.socket)
                tcp = transport.router()
                transport.make_curve_server(tcp, token)
                transport.bind_tcp(tcp, head.host, port)
                sockets.append(tcp)
        except (OSError, ValueError, transport.ZMQError) as exc:
            log.warning("cannot answer in the head's place (%s): agents and drivers give up after their "
                        "own %.0f s", exc, HEAD_TIMEOUT_S)
        answer = protocol.encode("Error", ("head-gone", why))
        loop = transport.EventLoop()

        def answer_all(sock):
            for frames in transport.recv_all(sock):
                transport.send(sock, [frames[0], *answer])

        def on_wake():
            try:
                os.read(self._wake_r, 512)
            except BlockingIOError:
                pass
            if self.stopping:
                loop.stop()

        def on_lifeline():
            if not os.read(0, 4096):
                loop.stop()
        for sock in sockets:
            loop.add_reader(sock, zap.handle if zap is not None and sock is zap.socket
                            else lambda sock=sock: answer_all(sock))
        loop.add_reader(self._wake_r, on_wake)
        if self.lifeline:
            loop.add_reader(0, on_lifeline)
        loop.call_later(HEAD_TIMEOUT_S, loop.stop)
        try:
            if not self.stopping:
                loop.run()
        finally:
            for sock in sockets:
                sock.close(0)
            loop.close()

    def _was_ready(self) -> bool:
        """The head wrote its pid file (head.py does once it listens)."""
        try:
            with open(os.path.join(self.session_dir, "head.pid")) as f:
                return f.read().strip() == str(self.proc.pid)
        except OSError:
            return False

    def _wait(self, timeout) -> None:
        for key, _ in self.sel.select(timeout):
            if key.data == "signal":
                try:
                    os.read(self._wake_r, 512)
                except BlockingIOError:
                    pass
            elif key.data == "lifeline" and not os.read(0, 4096):
                log.info("lifeline closed: stopping the head")
                self.stopping = self.orphaned = True

    def _stop_head(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_GRACE_S)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: it did not stop
            self.proc.kill()
            self.proc.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="farpool-headmon")
    parser.add_argument("--session-dir", required=True)
    parser.add_argument("--lifeline", action="store_true", help="stop (and stop the head) when stdin closes")
    parser.add_argument("head_args", nargs=argparse.REMAINDER, help="-- then the head's arguments")
    args = parser.parse_args(argv)
    head_args = args.head_args[1:] if args.head_args[:1] == ["--"] else args.head_args
    session.set_process_name("farpool-headmon")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with open(os.path.join(args.session_dir, "headmon.pid"), "w") as f:
        f.write(str(os.getpid()))
    return Supervisor(args.session_dir, head_args, args.lifeline).run()


if __name__ == "__main__":
    sys.exit(main())
