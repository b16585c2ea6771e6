"""Worker log files: rotated and bounded, and read from a cursor across rotations."""

import os

from farpool._private import worker_logs
from farpool._private.worker_logs import RotatingLog, plan, read


def test_a_worker_log_rotates_and_keeps_a_bounded_number_of_files(tmp_path):
    path = worker_logs.log_path(str(tmp_path), "7")
    log = RotatingLog(path, rotate_bytes=100, keep=2)
    for i in range(10):
        log.write(f"{i}".encode() * 60 + b"\n")  # 61 bytes: each write past the first rotates
    log.close()
    assert sorted(os.listdir(tmp_path)) == ["worker-7.log", "worker-7.log.1", "worker-7.log.2"]
    assert open(path, "rb").read().startswith(b"9")
    assert open(path + ".2", "rb").read().startswith(b"7")
    files = worker_logs.worker_logs(str(tmp_path))["7"]
    assert [os.path.basename(f[0]) for f in files] == ["worker-7.log.2", "worker-7.log.1", "worker-7.log"]
    assert sum(f[2] for f in files) <= 3 * 100


def test_reading_continues_from_the_cursor_across_a_rotation(tmp_path):
    path = worker_logs.log_path(str(tmp_path), "1")
    log = RotatingLog(path, rotate_bytes=10, keep=1)
    log.write(b"aaaa\n")
    data, cursor = read(worker_logs.worker_logs(str(tmp_path))["1"], None, 1000)
    assert data == b"aaaa\n"
    log.write(b"bbbb\n")
    log.write(b"cccc\n")  # rotates: "aaaa\nbbbb\n" is now worker-1.log.1
    data, cursor = read(worker_logs.worker_logs(str(tmp_path))["1"], cursor, 1000)
    assert data == b"bbbb\ncccc\n"
    data, cursor2 = read(worker_logs.worker_logs(str(tmp_path))["1"], cursor, 1000)
    assert data == b"" and cursor2 == cursor
    log.close()


def test_plan_respects_the_budget_and_restarts_when_the_cursor_was_rotated_away():
    files = [("old", 1, 10), ("cur", 2, 5)]
    assert plan(files, None, 12) == ([("old", 0, 10), ("cur", 0, 2)], (2, 2))
    assert plan(files, (2, 2), 100) == ([("cur", 2, 3)], (2, 5))
    assert plan(files, (1, 4), 3) == ([("old", 4, 3)], (1, 7))
    assert plan(files, (99, 40), 100) == ([("old", 0, 10), ("cur", 0, 5)], (2, 5))  # gone: from the oldest
