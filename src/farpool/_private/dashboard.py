"""The dashboard: a small HTTP server in the head process, its JSON API, and who may use it.

Owned by the head process (``head.main`` starts it); runs on threads of its own
(``ThreadingHTTPServer``: one listening thread, a short-lived thread per request).
It never touches the head's tables itself: each API question is handed to the
head's event loop (``loop.call_soon``) and answered by ``cluster_state.query``,
the same code that answers ``farpool status`` / ``farpool list``::

    browser --GET /api/status--> [Host check] [token or session cookie] --call_soon--> head loop
            <------------------------- JSON ------------------------------- cluster_state.query
    /api/stack, /api/objects: a short-lived client connection to each node agent
                              (DumpStacks / StoreStats, as `farpool stack` / `memory` ask)

Who may use it: whoever holds the cluster token (``Authorization: Bearer TOKEN``),
or a browser that opened a one-time link (``/?login=CODE``: the code works once and
sets an HttpOnly, SameSite=Strict session cookie).  The ``Host`` header must name
this server (an address it listens on, or loopback), so a web page on another site
cannot reach it through DNS rebinding.  The page loads nothing from the internet.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit

from farpool._private import cluster_state, dashboard_page, protocol, session, transport

log = logging.getLogger("farpool.dashboard")

# Where the dashboard listens unless told otherwise: this machine only.
DEFAULT_HOST = "127.0.0.1"
# One-time links not yet used, and browser sessions, kept at most (oldest dropped first):
# more lets more people log in at once, fewer bounds what a flood of links can cost.
MAX_LINKS = 64
MAX_SESSIONS = 256
# How long an API question may wait for the head's loop, and for a node agent.
QUERY_TIMEOUT_S = 10.0
AGENT_TIMEOUT_S = 10.0
COOKIE = "farpool_dashboard"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


class Dashboard:
    """The server; ``url`` and ``new_link()`` are what ``init()`` and ``farpool start`` print."""

    def __init__(self, head, token: str, host: str = DEFAULT_HOST, port: int = 0, advertise: str | None = None):
        self.head = head
        self.token = token
        self._lock = threading.Lock()
        self._links: dict[str, float] = {}     # one-time code -> when made
        self._sessions: dict[str, float] = {}  # cookie value -> when made
        # Listen at once (the port and the links are known now); serve from a thread that first
        # imports http.server (tens of ms the head's start-up does not wait for).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((host, port))
            self.listener.listen(64)
        except OSError:
            self.listener.close()
            raise
        self.server = None
        self._closed = False
        self.host = host
        self.port = self.listener.getsockname()[1]
        shown = advertise if host in ("0.0.0.0", "::") and advertise else host
        self.shown_host = shown
        self.allowed_hosts = {h.strip("[]").lower() for h in (host, shown, *LOOPBACK_NAMES) if h}
        self.thread = threading.Thread(target=self._serve, name="farpool-dashboard", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.shown_host}]" if ":" in self.shown_host else self.shown_host
        return f"http://{host}:{self.port}/"

    def start(self) -> "Dashboard":
        self.thread.start()
        return self

    def _serve(self) -> None:
        """Accept connections until close(); a thread per request (http.server's ThreadingMixIn).
        http.server is imported when the first connection comes: with what it pulls in (email,
        http.client, ssl and OpenSSL) it would be about a third of an idle head's memory."""
        server = None
        while not self._closed:
            try:
                conn, address = self.listener.accept()
            except OSError:  # closed (close() shuts the socket down: accept returns at once)
                return
            if server is None:
                from http.server import ThreadingHTTPServer
                server = ThreadingHTTPServer(self.listener.getsockname()[:2], _handler_class(),
                                             bind_and_activate=False)
                server.socket.close()
                server.socket = self.listener
                server.daemon_threads = True
                server.dashboard = self
                self.server = server
            server.process_request(conn, address)

    def close(self) -> None:
        self._closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

    # --- who may use it ---
    def new_link(self) -> str:
        """A URL that logs one browser in, once."""
        code = session.random_text(24)
        with self._lock:
            self._links[code] = time.time()
            while len(self._links) > MAX_LINKS:
                self._links.pop(next(iter(self._links)))
        return f"{self.url}?login={code}"

    def use_link(self, code: str) -> str | None:
        """The new session's cookie value when ``code`` is an unused link, else None."""
        with self._lock:
            if self._links.pop(code, None) is None:
                return None
            cookie = session.random_text(32)
            self._sessions[cookie] = time.time()
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))
            return cookie

    def authorized(self, headers) -> bool:
        import hmac  # (imported by the first request: an idle head never loads OpenSSL)
        auth = headers.get("Authorization", "")
        if auth.startswith("Bearer ") and self.token and hmac.compare_digest(auth[7:].strip().encode(),
                                                                             self.token.encode()):
            return True
        for part in headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and value:
                with self._lock:
                    return any(hmac.compare_digest(value.encode(), s.encode()) for s in self._sessions)
        return False

    def host_ok(self, headers) -> bool:
        host = headers.get("Host", "")
        if host.startswith("["):
            name = host[1:].split("]", 1)[0]
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return name.lower() in self.allowed_hosts

    # --- answers ---
    def ask_head(self, what: str, params: dict):
        """``cluster_state.query`` on the head's loop; this thread waits for it."""
        done = threading.Event()
        box: list = []

        def run():
            try:
                box.append(("ok", cluster_state.query(self.head, what, params)))
            except ValueError as exc:
                box.append(("bad", str(exc)))
            except Exception as exc:  # noqa: BLE001 - answered, not raised into the loop
                log.exception("the dashboard's question %r failed", what)
                box.append(("error", repr(exc)))
            done.set()
        self.head.loop.call_soon(run)
        if not done.wait(QUERY_TIMEOUT_S):
            return "error", f"the head did not answer within {QUERY_TIMEOUT_S:.0f} s (it is busy or stuck)"
        return box[0]

    def live_nodes(self, node: str | None) -> list[dict]:
        kind, rows = self.ask_head("nodes", {"state": "ALIVE", "node": node, "limit": 10_000})
        if kind != "ok":
            raise RuntimeError(rows)
        return rows

    def ask_agents(self, tag: str, fields: tuple, node: str | None) -> list:
        """(node record, answer fields or an error text) from each live node (or the one ``node``)."""
        out = []
        for record in self.live_nodes(node):
            try:
                out.append((record, ask_agent(record, tag, fields, self.token)))
            except (OSError, ConnectionError, TimeoutError, protocol.ProtocolError) as exc:
                out.append((record, f"no answer: {exc}"))
        return out


def ask_agent(record: dict, tag: str, fields: tuple, token: str, timeout: float = AGENT_TIMEOUT_S) -> tuple:
    """One request to a node agent, as a client of it (ipc on this machine, CURVE TCP elsewhere);
    returns the answer's fields after the request id.  Blocking: call from a dashboard thread."""
    import zmq
    identity = b"c:dash" + os.urandom(6).hex().encode()
    sock = transport.dealer(identity)
    hello = protocol.encode("Hello", ("client", {"job_id": None, "worker_id": None, "node_id": None,
                                                 "log_to_driver": False, "pid": os.getpid(),
                                                 "pid_space": session.pid_space(), "driver": False}))
    try:
        ipc = record.get("ipc")
        if ipc and os.path.exists(ipc[len("ipc://"):]):
            sock.connect(ipc)
            transport.send(sock, hello)
        elif record.get("tcp"):
            transport.connect_tcp(sock, record["tcp"], token, hello)
        else:
            raise ConnectionError(f"node {record.get('node_id', '?')[:8]} has no address this head can reach")
        request_id = 1
        transport.send(sock, protocol.encode(tag, (request_id, *fields)))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(left * 1000, zmq.POLLIN):
                raise TimeoutError(f"node {record.get('node_id', '?')[:8]} did not answer {tag} within {timeout:.0f} s")
            got, answer, _ = protocol.decode(sock.recv_multipart())
            if got in ("Reply", "StoreStats") and answer and answer[0] == request_id:
                try:
                    transport.send(sock, protocol.encode("Goodbye", ("client", None)))
                except Exception:  # noqa: BLE001 - leaving anyway
                    pass
                return tuple(answer[1:])
    finally:
        sock.close(0)


def start(head, token: str, host: str | None, port: int, advertise: str | None, session_dir: str) -> Dashboard:
    """Serve the dashboard; its first one-time link goes to ``dashboard.link`` (0600) in the session
    directory, for `farpool start --head` to print."""
    dash = Dashboard(head, token, host or DEFAULT_HOST, port, advertise).start()
    fd = os.open(os.path.join(session_dir, "dashboard.link"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(dash.new_link())
    log.info("dashboard at %s", dash.url)
    return dash


def _handler_class():
    """The request handler (defined on first use: http.server is imported by the serving thread)."""
    global _Handler
    if _Handler is None:
        from http.server import BaseHTTPRequestHandler
        _Handler = type("DashboardHandler", (_HandlerMixin, BaseHTTPRequestHandler), {})
    return _Handler


_Handler = None


class _HandlerMixin:
    server_version = "farpool-dashboard"
    timeout = 60  # an idle kept-alive connection (and its thread) ends after this many seconds
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args) -> None:  # to the head's log, not stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        dash: Dashboard = self.server.dashboard
        if not dash.host_ok(self.headers):
            self._send(403, {"error": f"unknown Host {self.headers.get('Host')!r}: open the dashboard at {dash.url}"})
            return
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if parts.path == "/" and "login" in query:
            cookie = dash.use_link(query["login"])
            if cookie is None:
                self._send(401, {"error": "this link was used already or is not from this cluster; get a new "
                                          "one from farpool.init()['dashboard_url']"})
                return
            self._send(303, b"", "text/plain", {
                "Location": "/",
                "Set-Cookie": f"{COOKIE}={cookie}; HttpOnly; SameSite=Strict; Path=/"})
            return
        if not dash.authorized(self.headers):
            self._send(401, {"error": "the dashboard needs the cluster token: send 'Authorization: Bearer "
                                      "TOKEN', or open the one-time link that `farpool start --head` printed "
                                      "(init() returns one as dashboard_url)"},
                       extra={"WWW-Authenticate": 'Bearer realm="farpool"'})
            return
        if parts.path in ("/", "/index.html"):
            self._send(200, dashboard_page.PAGE.encode(), "text/html; charset=utf-8")
            return
        if not parts.path.startswith("/api/"):
            self._send(404, {"error": f"no page {parts.path}"})
            return
        self._api(dash, parts.path[len("/api/"):].replace("-", "_"), query)

    def _api(self, dash: Dashboard, what: str, query: dict) -> None:
        node = query.get("node") or None
        try:
            if what == "stack":
                pid = int(query["pid"]) if query.get("pid") else None
                answers = []
                for record, answer in dash.ask_agents("DumpStacks", (pid,), node):
                    answers.append(answer[0] if isinstance(answer, tuple) else
                                   {"node_id": record.get("node_id"), "error": answer})
                self._send(200, answers)
                return
            if what == "objects":
                rows = []
                limit = cluster_state._limit(query)
                for record, answer in dash.ask_agents("StoreStats", (limit,), node):
                    if not isinstance(answer, tuple):
                        rows.append({"node_id": record.get("node_id"), "error": answer})
                        continue
                    for row in answer[1]:
                        rows.append(dict(row, node_id=record.get("node_id"),
                                         state="SPILLED" if row.get("spilled") else "IN_MEMORY"))
                rows.sort(key=lambda r: -(r.get("size") or 0))
                self._send(200, rows[:limit])
                return
        except ValueError as exc:
            self._send(400, {"error": str(exc)})
            return
        except RuntimeError as exc:
            self._send(503, {"error": str(exc)})
            return
        if what not in cluster_state.WHATS:
            self._send(404, {"error": f"no API {what!r}: one of {', '.join(cluster_state.WHATS + ('stack', 'objects'))}"})
            return
        kind, answer = dash.ask_head(what, query)
        self._send({"ok": 200, "bad": 400}.get(kind, 503), answer if kind == "ok" else {"error": answer})

    def _send(self, code: int, body, content_type: str = "application/json", extra: dict | None = None) -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body, default=str).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
