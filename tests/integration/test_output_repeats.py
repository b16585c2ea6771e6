"""Worker output reaching the driver: the same line printed by many workers shows once, then
"[repeated Nx across cluster]" (log_repeats.py), end to end through launcher, agent and client."""

import farpool
from farpool._private import log_repeats
from farpool_testing import TIMEOUT, wait_until


@farpool.remote
def shout(i):
    print("loading the same shard")
    print(f"distinct line {i}")
    return i


def test_a_line_many_workers_print_shows_once_then_its_count(cluster, capsys, monkeypatch):
    seen = []

    def printed():
        seen.append(capsys.readouterr().out)
        return "".join(seen)

    monkeypatch.setattr(log_repeats.driver_filter, "window_s", 3600.0)  # every copy falls in the window
    monkeypatch.setattr(log_repeats.driver_filter, "seen", {})
    assert farpool.get([shout.remote(i) for i in range(8)], timeout=TIMEOUT) == list(range(8))
    wait_until(lambda: all(f"distinct line {i}" in printed() for i in range(8)), "every task's own line")
    wait_until(lambda: printed().count("loading the same shard") == 1 and "repeated" not in printed(),
               "the shared line once, its copies counted")
    monkeypatch.setattr(log_repeats.driver_filter, "window_s", 0.0)  # the window closes at the next output
    assert farpool.get(shout.remote(8), timeout=TIMEOUT) == 8
    wait_until(lambda: "loading the same shard [repeated 7x across cluster]" in printed(),
               "the count of the copies folded")
    lines = printed().splitlines()
    assert sum("[repeated" in line for line in lines) == 1, lines
    assert any(line.startswith("(shout pid=") and "distinct line 0" in line for line in lines), lines
