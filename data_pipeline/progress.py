"""A progress line for long data jobs: done/total, rate and ETA."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """Prints ``label: done/total (pct) rate unit/s ETA h:mm:ss`` at most every ``interval`` seconds.

    On a terminal the line is redrawn in place; in a log file (batch jobs) a new line is
    written every ``log_interval`` seconds so the log stays short.
    """

    def __init__(self, label: str, total: int, unit: str = "img", enabled: bool = True,
                 stream: TextIO | None = None, interval: float = 0.5, log_interval: float = 15.0,
                 initial: int = 0) -> None:
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else log_interval
        self.done = initial
        # The rate counts only work done in this run: resumed items cost nothing.
        self._start_done = initial
        self._t0 = time.monotonic()
        # The first line waits one interval: a rate measured over one item is noise.
        self._last = self._t0

    def line(self) -> str:
        """The current progress text."""
        elapsed = time.monotonic() - self._t0
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({pct:.1f}%)"
        if self.done > self._start_done:
            text += f" {rate:,.0f} {self.unit}/s"
        if self.done < self.total:
            text += " ETA " + (_clock((self.total - self.done) / rate) if rate > 0 else "?")
        return text

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items done; print if the interval has passed."""
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._emit(final=False)

    def close(self, note: str = "") -> None:
        """Print the final line (with elapsed time and an optional note)."""
        if self.enabled:
            self._emit(final=True, note=note)

    def _emit(self, final: bool, note: str = "") -> None:
        text = self.line()
        if final:
            text += f" in {_clock(time.monotonic() - self._t0)}" + (f"; {note}" if note else "")
        if self.tty:
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def quantity(n: int, noun: str, plural: str | None = None) -> str:
    """``1 shard``, ``3 shards``: a count with its noun in the right number."""
    return f"{n:,} {noun if n == 1 else (plural or noun + 's')}"
