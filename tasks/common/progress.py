"""Progress of long loops: a live bar on a terminal, and log records (the run's ``train.log``) every few seconds."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("progress")


class Progress:
    """Progress of a loop of ``total`` steps, shown only where ``enabled`` (rank 0).

    On a terminal a bar is redrawn in place on stderr; a log record goes to the ``progress`` logger every
    ``log_interval`` seconds and at the end, so a run's log file shows how far it got and how fast, terminal or not.
    """

    def __init__(self, total: int, desc: str, enabled: bool, log_interval: float = 10.0) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.start = self.last_drawn = self.last_logged = time.perf_counter()
        self.live = sys.stderr.isatty()
        self.log_interval = log_interval

    def update(self, done: int, postfix: str = "") -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        finished = done >= self.total
        draw = self.live and (now - self.last_drawn >= 0.2 or finished)
        record = now - self.last_logged >= self.log_interval or finished
        if not (draw or record):
            return
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        filled = int(24 * done / max(self.total, 1))
        status = f"{done}/{self.total} {rate:.1f} it/s eta {eta:.0f}s {postfix}".rstrip()
        if draw:
            self.last_drawn = now
            bar = f"{self.desc} [{'#' * filled}{'.' * (24 - filled)}] {status}"
            print(bar.ljust(100), end="\n" if finished else "\r", file=sys.stderr, flush=True)
        if record:
            self.last_logged = now
            log.info("%s: %s", self.desc, status)
