"""Worker output forwarded to a driver, with identical lines from many workers printed once.

Pure: the driver's client (its callback thread, ``_write_output``) passes each chunk of
worker output with the time; what comes back is what to print.  A line's text is what
follows the worker's prefix (``(task pid=..., node=...) ``), so the same message from
many workers counts as one.  The first copy prints at once; copies arriving within
REPEAT_WINDOW_S are counted and reported as "[repeated Nx across cluster]" with the
next output after the window closes (not on a timer: the count of a burst that is the
job's last output is not printed).
"""

from __future__ import annotations

# Identical lines this close together print once: longer folds more, shorter shows
# a message that legitimately repeats (a progress line) more often.
REPEAT_WINDOW_S = 5.0
# Distinct lines remembered at once (memory bound); beyond it, the oldest windows close early.
MAX_REMEMBERED = 10_000


def text_of(line: str) -> str:
    """The line without its worker prefix ``(name pid=N, node=X) ``."""
    if line.startswith("(") and " pid=" in line:
        end = line.find(") ")
        if end != -1:
            return line[end + 2:]
    return line


class RepeatFilter:
    def __init__(self, window_s: float = REPEAT_WINDOW_S):
        self.window_s = window_s
        self.seen: dict[str, list] = {}  # text -> [when first printed, copies since]

    def filter(self, data: str, now: float) -> str:
        out = self._closed(now)
        for line in data.splitlines(keepends=True):
            text = text_of(line)
            entry = self.seen.get(text)
            if entry is None:
                self.seen[text] = [now, 0]
                out.append(line)
            else:
                entry[1] += 1
        while len(self.seen) > MAX_REMEMBERED:
            text, (_, copies) = next(iter(self.seen.items()))
            del self.seen[text]
            if copies:
                out.append(_summary(text, copies))
        return "".join(out)

    def _closed(self, now: float) -> list[str]:
        """Summaries of the windows that closed: ``seen`` is in the order lines were first
        printed, so only its expired head is looked at (a chunk costs what it closes, not
        what is remembered)."""
        out = []
        while self.seen:
            text, (first, copies) = next(iter(self.seen.items()))
            if now - first < self.window_s:
                break
            del self.seen[text]
            if copies:
                out.append(_summary(text, copies))
        return out


def _summary(text: str, copies: int) -> str:
    return f"{text.rstrip(chr(10))} [repeated {copies}x across cluster]\n"

# The filter of this process's forwarded worker output (the driver's client, its callback thread).
driver_filter = RepeatFilter()
