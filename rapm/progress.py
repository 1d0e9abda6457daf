"""Progress lines where the user is looking, the full log in a file.

``python -m rapm --log FILE <stage>`` (what every Snakemake rule runs) sends everything the process
writes - log records, library warnings, prints - to FILE, and keeps the terminal's stderr for the
progress lines of long loops only: one line every ``RAPM_PROGRESS_SECONDS`` (default 30) seconds and
one at the end, ``train rapm: 120/600 (20%), 3.4 it/s, ETA 2m21s``. Snakemake shows a job's stderr,
so a user sees each long job move; ``tail -f logs/<stage>/<name>.log`` shows everything. Without
``--log`` the progress lines go to stderr beside the log records.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO, Iterable, Iterator, TypeVar

log = logging.getLogger("rapm.progress")
T = TypeVar("T")

_terminal: IO[str] | None = None  # the terminal's stderr when --log redirected the process's output


def redirect_output(path: str) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``path`` and keep the original
    stderr for progress lines (:class:`Progress`)."""
    global _terminal
    sys.stdout.flush()
    sys.stderr.flush()
    _terminal = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def to_terminal(text: str) -> None:
    """Write one line to the terminal's stderr when :func:`redirect_output` took the process's output (else
    nothing: the caller's own message already went to stderr)."""
    if _terminal is not None:
        _terminal.write(text + "\n")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Counts ``done`` of ``total`` units and reports ``label: done/total (pct), rate unit/s, ETA`` at most
    every ``every_s`` seconds (``RAPM_PROGRESS_SECONDS``) and when the total is reached."""

    def __init__(self, total: int, label: str, unit: str = "it", initial: int = 0, every_s: float | None = None):
        self.total, self.label, self.unit, self.done = int(total), label, unit, int(initial)
        self.every_s = float(os.environ.get("RAPM_PROGRESS_SECONDS", 30)) if every_s is None else every_s
        self._start_done, self._t0 = self.done, time.monotonic()
        self._last = self._t0
        self.note = ""

    def line(self) -> str:
        elapsed = time.monotonic() - self._t0
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = f", ETA {_duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        done = f", done in {_duration(elapsed)}" if self.done >= self.total else ""
        return f"{self.label}: {self.done}/{self.total} ({pct:.0f}%), {rate:.3g} {self.unit}/s{eta}{done}" + (
            f" [{self.note}]" if self.note else ""
        )

    def report(self) -> None:
        text = self.line()
        self._last = time.monotonic()
        if _terminal is not None:
            _terminal.write(text + "\n")
        log.info(text)

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        if self.done >= self.total or time.monotonic() - self._last >= self.every_s:
            self.report()


def progress(items: Iterable[T], total: int, label: str, unit: str = "it", weight=None) -> Iterator[T]:
    """Yield ``items``, counting each as ``weight(item)`` units (default 1) of ``total`` (:class:`Progress`)."""
    bar = Progress(total, label, unit)
    for item in items:
        yield item
        bar.update(1 if weight is None else weight(item))
