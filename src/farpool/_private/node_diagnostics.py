"""The node agent's answers to ``farpool stack`` and ``farpool logs``: its workers' stacks and output.

Part of the node agent (node.py): ``DiagnosticsPart`` is mixed into ``NodeAgent`` and
runs on the agent's one thread; nothing else may call it.  It owns ``stack_requests``
(set in ``NodeAgent.__init__``) and reads ``worker_pids``, ``pids_ever`` and the
leases' workers; the files it reads are written by the workers (stacks.py,
worker_logs.py).
"""

from __future__ import annotations

import os
import time

from farpool._private import stacks, worker_logs

class DiagnosticsPart:
    """NodeAgent's answers to DumpStacks and ReadLogs."""

    # --- stacks (farpool stack) ---
    def _on_DumpStacks(self, client, request_id, pid) -> None:
        """Every worker's (or the one ``pid``'s) threads' stacks and task: Reply(request_id, {...}).

        One request at a time: each truncates the workers' stack files before signalling."""
        self.stack_requests.append((client, request_id, pid))
        if len(self.stack_requests) == 1:
            self._start_stack_dump()

    def _start_stack_dump(self) -> None:
        client, request_id, pid = self.stack_requests[0]
        chosen = {wid: p for wid, p in self.worker_pids.items() if pid is None or p == pid}
        ready = {}
        for wid, p in chosen.items():
            worker = self.leases.workers.get(wid)
            if worker is None or worker.state == "STARTING":  # not yet able to dump: see stacks.install
                continue
            path = stacks.stack_path(self.session_dir, wid)
            try:
                os.truncate(path, 0)
                os.kill(p, stacks.DUMP_SIGNAL)
            except OSError:  # it exited meanwhile (or never made its file)
                continue
            ready[p] = wid
        collection = stacks.StackCollection(list(ready), time.monotonic())
        self._check_stack_dump(chosen, ready, collection)

    def _check_stack_dump(self, chosen: dict, ready: dict, collection) -> None:
        sizes = {p: stacks.size_of(stacks.stack_path(self.session_dir, wid)) for p, wid in ready.items()}
        if not collection.observe(sizes, time.monotonic()):
            self.loop.call_later(stacks.DUMP_SETTLE_S / 5, self._check_stack_dump, chosen, ready, collection)
            return
        workers = []
        for wid, p in sorted(chosen.items(), key=lambda item: item[1]):
            if p in ready:
                status = collection.done[p]
                stack = stacks.read_dump(stacks.stack_path(self.session_dir, wid))
            else:
                status, stack = "starting", ""
            workers.append({"pid": p, "worker_id": wid, "status": status, "stack": stack,
                            "task": stacks.read_task(stacks.task_path(self.session_dir, wid))})
        client, request_id, pid = self.stack_requests.pop(0)
        self._send(client, "Reply", request_id, {"node_id": self.node_id, "workers": workers})
        if self.stack_requests:
            self._start_stack_dump()

    # --- logs (farpool logs) ---
    def _on_ReadLogs(self, client, request_id, pid, cursors: dict) -> None:
        """Worker output kept here after each worker's cursor (see worker_logs): Reply(request_id,
        {"node_id", "workers": [{"worker_id", "pid", "alive", "data", "cursor"}]}), at most
        worker_logs.READ_BYTES_PER_REPLY bytes in all (ask again with the cursors for more)."""
        budget = worker_logs.READ_BYTES_PER_REPLY
        workers = []
        for wid, files in sorted(worker_logs.worker_logs(self.session_dir).items(),
                                 key=lambda item: self.pids_ever.get(item[0], 0)):
            if pid is not None and self.pids_ever.get(wid) != pid:
                continue
            data, cursor = worker_logs.read(files, cursors.get(wid), budget)
            budget -= len(data)
            workers.append({"worker_id": wid, "pid": self.pids_ever.get(wid), "alive": wid in self.worker_pids,
                            "data": data, "cursor": cursor})
        self._send(client, "Reply", request_id, {"node_id": self.node_id, "workers": workers})
