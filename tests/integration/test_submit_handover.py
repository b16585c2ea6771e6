"""A task that a leased worker can start at once is handed to it by the submitting thread
(submitter.Submitter._starts_now), not queued for the I/O thread: woken for it, that thread
waits for the GIL, which a caller going on submitting (a map pickling its next chunks) keeps
for up to the 5 ms switch interval while the worker idles."""

import threading

import pytest

import farpool
from farpool._private import runtime, submitter
from farpool_testing import wait_at_gate


@farpool.remote
def gated(path, value):
    return wait_at_gate(path, value)


@farpool.remote
def echo(x):
    return x


@pytest.fixture
def submitting_threads(monkeypatch):
    """The name of the thread that ran each task's on_submit, in order."""
    names = []
    on_submit = submitter.Submitter.on_submit

    def noting(self, task):
        names.append(threading.current_thread().name)
        return on_submit(self, task)

    monkeypatch.setattr(submitter.Submitter, "on_submit", noting)
    # Idle leases stay for the whole test (they go back after 50 ms otherwise: the test
    # must not depend on how fast it runs).
    monkeypatch.setattr(submitter, "LEASE_LINGER_S", 60.0)
    return names


def test_a_second_idle_worker_gets_its_task_from_the_submitting_thread(cluster, gate, submitting_threads):
    # Two workers leased and idle: one parked for the fast path, one not.
    held = [gated.remote(gate.path, i) for i in range(2)]
    gate.wait_arrivals(2)
    gate.open()
    assert farpool.get(held) == [0, 1]
    client = runtime.client()
    handed_over = 0
    for i in range(5):  # (the I/O thread may be busy at that instant: it queues the task then)
        submitting_threads.clear()
        first = echo.remote(i)   # to the parked lease (submit_direct: no on_submit)
        second = echo.remote(-i)  # to the other idle worker
        state = client.task_state(second)
        assert farpool.get([first, second]) == [i, -i]
        if submitting_threads == [threading.current_thread().name]:
            handed_over += 1
            assert state == "RUNNING", "handed over by the caller, the task is on its worker at once"
    assert handed_over >= 1, "every task was left for the I/O thread"
