"""Cleaning up after dead sessions must never take a session being made for a dead one."""

import os
import subprocess
import sys

import pytest

from farpool._private import session


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("FARPOOL_TMPDIR", str(tmp_path))
    return tmp_path


def make_session(root, name, owner_pid_text):
    path = root / (session.SESSION_PREFIX + name)
    path.mkdir(mode=0o700)
    (path / "owner.pid").write_text(owner_pid_text)
    return path


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_session_whose_pid_file_is_still_empty_is_kept(root):
    starting = make_session(root, "starting", "")  # created, its pid not written yet
    dead = make_session(root, "dead", str(dead_pid()))
    alive = make_session(root, "alive", str(os.getpid()))
    session.remove_dead_sessions()
    assert starting.exists() and alive.exists()
    assert not dead.exists()


def test_a_new_session_directory_has_its_pid_at_once(root):
    path = session.new_session_dir()
    assert sorted(os.listdir(path)) == ["owner.pid"]
    assert int(open(os.path.join(path, "owner.pid")).read()) == os.getpid()
    session.remove_dead_sessions()
    assert os.path.exists(path)
    session.remove_session(path)


def test_a_live_session_of_another_tmp_root_keeps_its_store_segments(tmp_path, monkeypatch):
    # Every farpool.init sweeps the machine's /dev/shm for segment directories of dead sessions.
    # Sessions under another FARPOOL_TMPDIR (another user's test run, another suite) are not in our
    # root: their live segments must stay (they were taken for dead: their objects vanished with
    # "No such file or directory: /dev/shm/farpool-s-...-/seg-N").
    from farpool._private import store
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setenv("FARPOOL_SHM_PATH", str(shm))
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    theirs.mkdir()
    ours.mkdir()
    live = make_session(theirs, "live", str(os.getpid()))
    crashed = make_session(theirs, "crashed", str(os.getpid()))
    live_segments, in_shm = store.choose_dir(str(live), "a" * 16, 1)
    crashed_segments, _ = store.choose_dir(str(crashed), "b" * 16, 1)
    assert in_shm and os.path.dirname(live_segments) == str(shm)
    (crashed / "owner.pid").unlink()
    crashed.rmdir()  # its node agent crashed and its session directory went: its segments are litter
    monkeypatch.setenv("FARPOOL_TMPDIR", str(ours))
    session.remove_dead_sessions()
    assert os.path.isdir(live_segments), "the live session of another tmp root lost its object store"
    assert not os.path.exists(crashed_segments)
