"""Per-epoch progress: a one-line bar on an interactive terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress"]


class Progress:
    """Reports ``done`` of ``total`` batches of an epoch with images/s and the running loss.

    On a TTY the line is redrawn in place (at most ~10 times a second); elsewhere (logs,
    pipes, CI) one plain line is printed every ``log_every`` batches (0: never). Disabled
    entirely when ``enabled`` is False (ranks other than 0).
    """

    def __init__(self, desc: str, total: int, *, enabled: bool = True, log_every: int = 0,
                 stream: Optional[TextIO] = None) -> None:
        self.desc, self.total = desc, total
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every = log_every
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, done: int, images: int, loss: float, acc: float) -> None:
        if not self.enabled:
            return
        elapsed = max(1e-9, time.perf_counter() - self.start)
        rate = images / elapsed
        if self.tty:
            now = time.perf_counter()
            if done < self.total and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            width = 24
            filled = int(width * done / max(1, self.total))
            bar = "#" * filled + "-" * (width - filled)
            eta = (self.total - done) * elapsed / max(1, done)
            self.stream.write(f"\r{self.desc} [{bar}] {done}/{self.total} "
                              f"loss {loss:.4f} acc {acc:.3f} {rate:.1f} img/s eta {eta:.0f}s ")
            self.stream.flush()
        elif self.log_every and (done % self.log_every == 0 or done == self.total):
            print(f"{self.desc} step {done}/{self.total} loss {loss:.4f} acc {acc:.3f} "
                  f"{rate:.1f} img/s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
