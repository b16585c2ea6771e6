"""The version handshake's rule (farpool._private.versions.mismatch), without processes."""

from farpool._private import versions


def test_the_same_versions_join():
    assert versions.mismatch(versions.ours(), "node agent 7f2c on b", "the head at a:1") is None


def test_another_farpool_version_is_refused_naming_both(monkeypatch):
    theirs = dict(versions.ours(), farpool="0.0.9")
    why = versions.mismatch(theirs, "node agent 7f2c on b", "the head at a:1")
    py = versions.PYTHON_VERSION
    assert why.startswith(f"node agent 7f2c on b runs farpool 0.0.9 on Python {py}, but the head at a:1 "
                          f"runs farpool {versions.FARPOOL_VERSION} on Python {py}")
    assert f"Install farpool {versions.FARPOOL_VERSION} on Python {py} there" in why
    # Our side patched instead (what a test of a whole process does): the same rule.
    monkeypatch.setattr(versions, "FARPOOL_VERSION", "9.9.9")
    assert "runs farpool 0.0.9" in versions.mismatch(theirs, "x", "y")
    assert "y runs farpool 9.9.9" in versions.mismatch(theirs, "x", "y")


def test_another_python_minor_version_is_refused_naming_both():
    theirs = dict(versions.ours(), python="3.99")
    why = versions.mismatch(theirs, "this driver (pid 7)", "the head at a:1")
    assert f"runs farpool {versions.FARPOOL_VERSION} on Python 3.99, but the head" in why
    assert f"on Python {versions.PYTHON_VERSION};" in why


def test_a_peer_that_does_not_say_its_versions_is_refused():
    why = versions.mismatch(None, "node agent 1 on b", "the head")
    assert "runs farpool (unknown: older than 0.1) on Python ?" in why
