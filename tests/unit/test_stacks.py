"""The pure parts of `farpool stack`: when a dump is complete, and the task board."""

from farpool._private import stacks
from farpool._private.stacks import DUMP_CAP_S, DUMP_SETTLE_S, StackCollection


def test_a_dump_is_complete_once_its_size_settles():
    c = StackCollection([10, 11], now=0.0)
    assert not c.observe({10: 0, 11: 0}, 0.01)
    assert not c.observe({10: 120, 11: 0}, 0.02)       # 10 is writing
    assert not c.observe({10: 300, 11: 50}, 0.03)
    assert not c.observe({10: 300, 11: 50}, 0.03 + DUMP_SETTLE_S / 2)
    assert c.observe({10: 300, 11: 50}, 0.03 + DUMP_SETTLE_S)
    assert c.done == {10: "complete", 11: "complete"}


def test_an_empty_file_never_counts_as_a_complete_dump_and_the_wait_is_capped():
    c = StackCollection([10, 11], now=0.0)
    assert not c.observe({10: 0, 11: 40}, 1.0)
    assert c.pending() == [10, 11]
    assert not c.observe({10: 0, 11: 80}, DUMP_CAP_S - 0.01)
    assert c.observe({10: 0, 11: 90}, DUMP_CAP_S)
    assert c.done == {10: "no answer", 11: "incomplete"}


def test_no_workers_is_done_at_once():
    assert StackCollection([], now=0.0).observe({}, 0.0)


def test_the_task_board_shows_the_running_task_and_idle_after(tmp_path):
    path = str(tmp_path / "w-1.task")
    board = stacks.TaskBoard(path)
    assert stacks.read_task(path) is None
    board.started(b"\xab" * 16, "train_step")
    assert stacks.read_task(path) == {"task_id": "ab" * 16, "name": "train_step"}
    board.ended()
    assert stacks.read_task(path) is None
    board.started(b"\xcd" * 16, "train_step")  # (the same name: only the id is written)
    assert stacks.read_task(path) == {"task_id": "cd" * 16, "name": "train_step"}
    board.started(None, "Counter.__init__" + "x" * 500)  # long names are cut to the board's size
    task = stacks.read_task(path)
    assert task["task_id"] is None and task["name"].startswith("Counter.__init__")
    assert len(task["name"]) < stacks.TASK_BOARD_BYTES
    board.ended()
    assert stacks.read_task(path) is None
    assert stacks.read_task(str(tmp_path / "missing")) is None
