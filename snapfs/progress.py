"""A one-line progress report on stderr for long commands (export, import, send, receive,
replicate, backup).

On by default when stderr is a terminal; never on a pipe or a file, nor with `--json`
(`wanted`). The line is rewritten in place at most five times a second and ended with a
newline by `close`.
"""

import sys
import time
from typing import TextIO

from snapfs.units import format_size


def wanted(as_json: bool, off: bool, err: TextIO | None = None) -> bool:
    """Whether to show progress: stderr is a terminal, not --json, not --no-progress."""
    err = err or sys.stderr
    return not as_json and not off and err.isatty()


class Progress:
    """`add(n)` as bytes go by; `total` None: no percentage (a stream of unknown length)."""

    def __init__(self, what: str, total: int | None, enabled: bool, err: TextIO | None = None):
        self.what = what
        self.total = total
        self.enabled = enabled
        self.err = err or sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self._shown = 0.0
        self._width = 0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._shown >= 0.2:
            self._shown = now
            self._draw(now)

    def update(self, done: int) -> None:
        """`done` bytes in all (a tool that reports its own progress: qemu-img -p)."""
        self.add(done - self.done)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self.started, 1e-3)
        line = f"{self.what}: {format_size(self.done)}"
        if self.total:
            line += f" of {format_size(self.total)} ({100 * self.done // self.total}%)"
        line += f", {format_size(int(rate))}/s"
        self.err.write("\r" + line.ljust(self._width))
        self.err.flush()
        self._width = len(line)

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.err.write("\n")
            self.err.flush()
