"""A worker's main loop without a cluster: an owner's first batch and a TakeBack for its tail
that come together, in the poll that accepts the owner's stream (a fresh worker, busy starting,
while its owner's burst outgrew it).  The doorbell's handler reads the stream's bytes itself;
the head of the batch must still run (it waited for ever: a stalled get() in CI)."""

import os
import pickle
import select
import socket

import pytest

from farpool._private import context as context_mod
from farpool._private import protocol, unix_streams, worker

CALLER = (b"c:test-owner", "node-test", None, os.getpid())


def _spec(task_id: bytes) -> tuple:
    return tuple(protocol.TaskSpec(task_id, b"h" * 20, None, "noop", b"", 0, [], 1, None,
                                   tuple(protocol.TaskLease([], 1, {"CPU": 1}))))


@pytest.fixture
def bare_worker(tmp_path, monkeypatch):
    """A Worker whose tasks are recorded, not run (no job, no client), and no doorbell thread
    (the main loop alone answers the doorbell here, as it does between tasks)."""
    ran = []

    def record(self, task, arg_bufs, ref_bufs, batch):
        ran.append(task.task_id)
        return (task.task_id, worker.RETIRED, None, 0.0, 0.0)

    monkeypatch.setattr(worker.Worker, "_run_one", record)
    monkeypatch.setattr(worker.Worker, "_watch_doorbell", lambda self: None)
    read_end, write_end = os.pipe()
    saved = (context_mod.context.node_id, context_mod.context.worker_id)
    w = worker.Worker({"worker_id": "7", "node_id": "n" * 16, "session_dir": str(tmp_path),
                       "agent_address": f"ipc://{tmp_path}/no-agent", "lifeline_fd": read_end})
    try:
        yield w, ran, str(tmp_path)
    finally:
        w.close()
        os.close(read_end)
        os.close(write_end)
        context_mod.context.node_id, context_mod.context.worker_id = saved


def _messages(owner, want: int) -> list:
    """Decoded messages from the worker, waiting (bounded) for ``want`` of them."""
    got = []
    poller = select.poll()
    poller.register(owner.fd, select.POLLIN)
    while len(got) < want and poller.poll(10_000):
        got += [protocol.decode(frames)[:2] for frames in owner.read()]
        if owner.eof:
            break
    return got


def test_the_head_of_a_first_batch_runs_when_its_tail_is_taken_back_in_the_accepting_poll(bare_worker):
    w, ran, session_dir = bare_worker
    owner = unix_streams.StreamChannel.connect(os.path.join(session_dir, "w-7"))
    try:
        head, tail = b"task-head", b"task-tail"
        owner.send(protocol.encode("ExecuteTask", (tuple(protocol.ExecuteTask([_spec(head), _spec(tail)], CALLER)))))
        bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bell.sendto(pickle.dumps(([tail], ("node", 1), CALLER[0])), os.path.join(session_dir, "w-7.tb"))
        bell.close()
        # One iteration: the listener and the doorbell are both readable in its poll; the stream
        # is accepted there, and the doorbell's handler reads it (the stream is not readable after).
        w.loop.run_once(max_wait_s=5)
        assert not w.batches, "the head of the batch was read but left queued, never run"
        assert ran == [head]
        replies = _messages(owner, 2)
        assert ("TakenBack", ([tail], ("node", 1))) in replies
        finished = [fields for tag, fields in replies if tag == "TaskFinished"]
        assert [result[0] for result in finished[0][0]] == [head]
    finally:
        owner.close()
