"""The versions every process of a cluster must share, checked when a peer joins.

Pickled task specs, wire messages and the store's layout change between farpool
releases, and pickles of one Python minor version may not load in another: a
node agent or driver with another farpool version or Python ``major.minor`` is
refused when it joins (by the head, which every node and driver says hello to
first), with a message naming both versions, instead of failing later on a task.
Pure: the head and the client call ``mismatch`` on what the other side sent.
"""

from __future__ import annotations

import sys

from farpool._version import __version__

FARPOOL_VERSION = __version__
PYTHON_VERSION = f"{sys.version_info[0]}.{sys.version_info[1]}"


def ours() -> dict:
    """What a peer tells the other side of a join (read at call time: tests patch these)."""
    return {"farpool": FARPOOL_VERSION, "python": PYTHON_VERSION}


def mismatch(theirs: dict | None, what: str, here: str) -> str | None:
    """None when ``theirs`` (a peer's ``ours()``) matches ours, else why the peer is refused.

    ``what`` names the peer ("node agent 7f2c on host-b"), ``here`` names us ("the head at ...").
    """
    mine = ours()
    theirs = theirs or {}
    wrong = [key for key in ("farpool", "python") if theirs.get(key) != mine[key]]
    if not wrong:
        return None
    def describe(v: dict) -> str:
        return f"farpool {v.get('farpool') or '(unknown: older than 0.1)'} on Python {v.get('python') or '?'}"
    return (f"{what} runs {describe(theirs)}, but {here} runs {describe(mine)}; every node and driver "
            f"of a cluster must run the same farpool version and Python minor version. Install "
            f"farpool {mine['farpool']} on Python {mine['python']} there (or start the cluster with "
            f"the versions it has)")
