"""The head's tables on disk: an embedded SQLite database (WAL) in its session directory.

Owned by the head (head.py): its loop thread calls ``put``/``delete`` (they only queue
the change and wake the writer) and ``load`` once at start; a writer thread of this
module turns what queued into one transaction per batch, so the head never waits on a
disk, let alone an fsync::

    head loop --put/delete--> pending (dict, last change per row wins) --wake--> writer thread
                                                                                  |
                                                       one transaction per batch  v
                                                       <session>/head.db (+ -wal, -shm)

What is kept (one table each, so ``sqlite3 head.db`` shows them):

- ``meta``: the head's epoch (how many times it started on this database), the next
  job id, the first lease request id of this epoch, the TCP port and the address;
- ``nodes``: each node's public record (alive or dead, resources, addresses);
- ``actors``: each actor's id, name, namespace, whether detached, its job, its spec
  (the pickled class and constructor arguments: what a restart runs again) and its
  state (a small dict, rewritten on each change; the spec is written once);
- ``jobs``: each job's driver and whether it still runs;
- ``kv``: the head's key-value store (runtime_env packages shipped by drivers);
- ``placement_groups``: a key-value table kept for the placement groups (owned by the
  code that builds them: ``put("placement_groups", group_id, record)``).

Durability: ``synchronous=NORMAL`` in WAL mode: a transaction is in the WAL when its
batch is written, so a head killed (``kill -9``) loses at most the changes queued in the
last few milliseconds; a power cut may lose the transactions since the last checkpoint,
and never corrupts the file.  What a head loses this way the agents and drivers tell
it again when they re-register.  Values are pickles: the file lives in the 0700
session directory and is made 0600, like the token beside it.
"""

from __future__ import annotations

import logging
import os
import pickle
import sqlite3
import threading

log = logging.getLogger("farpool.head_store")

# The file name of the database in a session directory (and in a --restore DIR).
DB_NAME = "head.db"
# Tables of plain (key, value) rows; "actors" has columns of its own (see SCHEMA).
KV_TABLES = ("meta", "nodes", "jobs", "kv", "placement_groups")
SCHEMA = [f"CREATE TABLE IF NOT EXISTS {t} (key TEXT PRIMARY KEY, value BLOB NOT NULL)" for t in KV_TABLES] + [
    "CREATE TABLE IF NOT EXISTS actors (actor_id TEXT PRIMARY KEY, name TEXT, namespace TEXT, "
    "detached INTEGER NOT NULL, job_id TEXT, spec BLOB NOT NULL, state BLOB NOT NULL)"]
# Most changes written in one transaction: larger batches cost fewer commits under a
# burst (thousands of actors created at once), smaller ones hold the file lock shorter.
MAX_BATCH = 5000

_DELETE = object()


class HeadStore:
    """The head's tables in ``path``; see the module docstring.  ``put``/``delete``/``put_actor``
    from the head's loop thread only; ``flush`` and ``close`` from any thread."""

    def __init__(self, path: str):
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # 0600 before sqlite opens it
        os.close(fd)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        for statement in SCHEMA:
            self._db.execute(statement)
        self._cond = threading.Condition()
        self._pending: dict[tuple, object] = {}  # (table, key) -> value, _DELETE or an actor row
        self._written = 0       # batches written (flush waits for its own)
        self._queued = 0        # batches asked for
        self._closing = False
        self.error: BaseException | None = None  # the writer's failure, logged once
        self._thread = threading.Thread(target=self._run, name="farpool-head-db", daemon=True)
        self._thread.start()

    # --- the head's loop thread ---
    def load(self) -> dict:
        """Every table as a dict: {"meta": {key: value}, ..., "actors": {actor_id: (spec, state)}}."""
        out = {}
        for table in KV_TABLES:
            out[table] = {k: pickle.loads(v) for k, v in self._db.execute(f"SELECT key, value FROM {table}")}
        out["actors"] = {a: (pickle.loads(spec), pickle.loads(state)) for a, spec, state in
                         self._db.execute("SELECT actor_id, spec, state FROM actors")}
        return out

    def put(self, table: str, key: str, value) -> None:
        if table not in KV_TABLES:
            raise ValueError(f"no table {table!r} in the head's database (tables: {', '.join(KV_TABLES)})")
        self._queue((table, str(key)), pickle.dumps(value, protocol=5))

    def delete(self, table: str, key: str) -> None:
        self._queue((table, str(key)), _DELETE)

    def put_actor(self, actor_id: str, spec: dict | None, state: dict) -> None:
        """An actor's row: ``spec`` when it is new (written once), else None (its state only)."""
        row = (None if spec is None else (spec.get("name"), spec.get("namespace"), int(bool(spec.get("detached"))),
                                          str(spec.get("job_id")), pickle.dumps(spec, protocol=5)),
               pickle.dumps(state, protocol=5))
        with self._cond:
            previous = self._pending.get(("actors", actor_id))
            if row[0] is None and isinstance(previous, tuple) and previous[0] is not None:
                row = (previous[0], row[1])  # its spec is not written yet: keep it in the batch
            self._pending[("actors", actor_id)] = row
            self._cond.notify()

    def _queue(self, key: tuple, value) -> None:
        with self._cond:
            self._pending[key] = value
            self._cond.notify()

    # --- any thread ---
    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until what was queued before this call is written (tests, shutdown)."""
        with self._cond:
            self._queued += 1
            target = self._queued
            self._cond.notify()
            return self._cond.wait_for(lambda: self._written >= target or self.error is not None
                                       or not self._thread.is_alive(), timeout)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=10)
        try:
            self._db.close()
        except sqlite3.Error:
            pass

    # --- the writer thread ---
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closing or self._queued > self._written)
                batch = list(self._pending.items())[:MAX_BATCH]
                for key, _ in batch:
                    del self._pending[key]
                target = self._queued
                closing = self._closing and not self._pending
            try:
                if batch:
                    self._write(batch)
            except sqlite3.Error as exc:  # a full disk: the head serves on, without a way back
                if self.error is None:
                    log.error("cannot write the head's database %s (%s): a restarted head would not find "
                              "what changed since", self.path, exc)
                self.error = exc
            with self._cond:
                if not self._pending:
                    self._written = target
                self._cond.notify_all()
            if closing:
                return

    def _write(self, batch: list) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            for (table, key), value in batch:
                if table == "actors":
                    if value is _DELETE:
                        db.execute("DELETE FROM actors WHERE actor_id = ?", (key,))
                    elif value[0] is None:
                        db.execute("UPDATE actors SET state = ? WHERE actor_id = ?", (value[1], key))
                    else:
                        name, namespace, detached, job_id, spec = value[0]
                        db.execute("INSERT OR REPLACE INTO actors VALUES (?, ?, ?, ?, ?, ?, ?)",
                                   (key, name, namespace, detached, job_id, spec, value[1]))
                elif value is _DELETE:
                    db.execute(f"DELETE FROM {table} WHERE key = ?", (key,))
                else:
                    db.execute(f"INSERT OR REPLACE INTO {table} VALUES (?, ?)", (key, value))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def copy_database(source_dir: str, target_dir: str) -> str:
    """Copy the database of ``source_dir`` (a session directory, or any directory holding a
    ``head.db``) into ``target_dir`` with SQLite's backup (consistent, WAL included); its path.

    Raises ValueError naming what is missing when ``source_dir`` holds no database."""
    source = os.path.join(source_dir, DB_NAME)
    if not os.path.isfile(source):
        raise ValueError(f"no head database in {source_dir} (looked for {DB_NAME}); give --restore the "
                         "session directory of the head to restore, or a copy of its head.db")
    target = os.path.join(target_dir, DB_NAME)
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    src = sqlite3.connect(source)  # not read-only: a killed head's WAL is recovered on open
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    return target
