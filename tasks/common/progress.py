"""Progress lines for long loops: a live bar on a terminal, a line every few seconds in a log file."""

from __future__ import annotations

import sys
import time


class Progress:
    """A progress line on rank 0: a live bar on a terminal, a line every few seconds in a log file."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.start = self.last = time.perf_counter()
        self.interval = 0.2 if sys.stderr.isatty() else 10.0

    def update(self, done: int, postfix: str = "") -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.interval and done < self.total):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        width = 24
        filled = int(width * done / max(self.total, 1))
        line = (f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                f"{rate:.1f} it/s eta {eta:.0f}s {postfix}")
        end = "\r" if sys.stderr.isatty() and done < self.total else "\n"
        print(line.ljust(100), end=end, file=sys.stderr, flush=True)
