"""pytest plugin for the compat runs: one "COMPAT <suite>: ..." line with the counts, and every exclusion.

Loaded by ``compat/run.py`` as ``-p count_plugin``; the suite's name comes from
``FARPOOL_COMPAT_SUITE``.
"""

from __future__ import annotations

import os


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    stats = terminalreporter.stats
    suite = os.environ.get("FARPOOL_COMPAT_SUITE", "compat")

    def count(key):
        return len([r for r in stats.get(key, []) if getattr(r, "when", "call") in ("call", "setup")])

    passed, failed, errors = count("passed"), count("failed"), count("error")
    skipped, xfailed, xpassed = count("skipped"), count("xfailed"), count("xpassed")
    write = terminalreporter.write_line
    for report in stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        write(f"  excluded {report.nodeid.split('::')[-1]}: {reason.removeprefix('Skipped: ')}")
    for report in stats.get("xfailed", []):
        write(f"  expected difference {report.nodeid.split('::')[-1]}: {report.wasxfail}")
    extra = f", {xfailed} expected differences" if xfailed else ""
    extra += f", {xpassed} xpassed (upstream xfail marks)" if xpassed else ""
    write(f"COMPAT {suite}: {passed} passed, {failed + errors} failed, {skipped} skipped{extra}")
