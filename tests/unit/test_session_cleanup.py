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
