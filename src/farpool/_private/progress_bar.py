"""Progress bars for waits: ``farpool.progress(refs)`` and ``farpool.wait(..., progress=True)``.

Runs on the waiting user thread (never farpool's own); draws on a terminal only.  Uses
tqdm when it is installed, else a one-line bar of its own.
"""

from __future__ import annotations

import time


def wait_with_bar(client, refs: list, num_returns: int, timeout: float | None, out, desc: str = "wait",
                  min_interval_s: float = 0.2, streams: tuple = ()) -> list[bool]:
    """``client.wait_entries`` with a bar of the refs done towards ``num_returns`` on ``out`` (a
    terminal; elsewhere the plain wait).  Waits in slices of ``min_interval_s``: each looks at
    every ref once, so the bar costs the same however many refs there are."""
    bar = Bar(num_returns, desc, out, min_interval_s)
    if not bar.shown:
        return client.wait_entries(refs, num_returns, timeout, streams=streams)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            step = min_interval_s if left is None else min(left, min_interval_s)
            flags = client.wait_entries(refs, num_returns, step, streams=streams)
            done = min(num_returns, sum(flags))
            bar.update(done - bar.done)
            if done >= num_returns or left is not None and left <= min_interval_s:
                return flags
    finally:
        bar.close()


class Bar:
    """tqdm if it is installed, else a minimal bar; silent when ``out`` is not a terminal."""

    def __init__(self, total: int, desc: str, out, min_interval_s: float):
        self.total, self.done, self.desc, self.out = total, 0, desc, out
        self.shown = _isatty(out)
        self.tqdm = None
        self.last = 0.0
        self.min_interval_s = min_interval_s
        self.started = time.monotonic()
        if self.shown:
            try:
                from tqdm.auto import tqdm
                self.tqdm = tqdm(total=total, desc=desc, file=out, mininterval=min_interval_s)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if not self.shown or n == 0:
            return
        if self.tqdm is not None:
            self.tqdm.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.min_interval_s or self.done >= self.total:
            self.last = now
            width = 30
            filled = width * self.done // max(1, self.total)
            rate = self.done / max(1e-9, now - self.started)
            self.out.write(f"\r{self.desc}: {self.done}/{self.total} [{'#' * filled}{'.' * (width - filled)}] "
                           f"{rate:.1f}/s")
            self.out.flush()

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
        elif self.shown:
            self.out.write("\n")
            self.out.flush()


def _isatty(out) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False
