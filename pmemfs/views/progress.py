"""Progress of long work (an unmount draining pins, a big zero, a check, a mount resetting stale
references): a rich bar on a terminal, plain lines elsewhere, nothing when asked to be quiet.

The client functions take a ``progress(text, done=None, total=None)`` callable and know nothing of
how it is shown; :func:`open_progress` makes one. Nothing is shown for work that ends within
``delay_s``, so quick commands print what they always printed.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections.abc import Iterator

from ..client import Progress, no_progress

# typing.TYPE_CHECKING would load typing, which umount (a command scripts run often) does without.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO

DELAY_S = 0.3
# Plain lines (a pipe, a log file): a line when the text changes, at most this often.
LINE_EVERY_S = 2.0


class _Lines:
    """``pmemfs: <what>: <text>`` lines on a stream that is not a terminal."""

    def __init__(self, what: str, stream: IO[str], delay_s: float) -> None:
        self.what, self.stream = what, stream
        self.started = time.monotonic()
        self.delay_s = delay_s
        self.last_text, self.last_s = "", 0.0

    def __call__(self, text: str, done: float | None = None, total: float | None = None) -> None:
        now = time.monotonic()
        if now - self.started < self.delay_s or text == self.last_text or now - self.last_s < LINE_EVERY_S:
            return
        if done is not None and total and "%" not in text:
            text = f"{text} ({100 * done / total:.0f}%)"
        self.last_text, self.last_s = text, now
        print(f"pmemfs: {self.what}: {text}", file=self.stream, flush=True)


class _Bar:
    """A rich progress bar (a spinner while the total is unknown), shown once the work has lasted
    ``delay_s`` and said something, and erased when it ends."""

    def __init__(self, what: str, stream: IO[str], delay_s: float) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.fields[what]}[/bold] {task.description}"),
            BarColumn(bar_width=20),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=Console(file=stream),
            transient=True,
        )
        self.task = self.progress.add_task("", total=None, what=what)
        self._lock = threading.Lock()
        self._started = self._closed = self._told = False
        self._shown_from = time.monotonic() + delay_s
        self._timer = threading.Timer(delay_s, self._start)
        self._timer.daemon = True
        self._timer.start()

    def _start(self) -> None:
        with self._lock:
            if self._told and not (self._closed or self._started):
                self.progress.start()
                self._started = True

    def __call__(self, text: str, done: float | None = None, total: float | None = None) -> None:
        if total:  # the bar says how far: a percentage in the text would say it twice
            text = re.sub(r":? \d+%$", "", text)
        self.progress.update(self.task, description=text, completed=done or 0, total=total)
        self._told = True
        if not self._started and time.monotonic() >= self._shown_from:
            self._start()

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._closed = True
            if self._started:
                self.progress.stop()


@contextlib.contextmanager
def open_progress(
    what: str, *, quiet: bool = False, stream: IO[str] | None = None, delay_s: float = DELAY_S
) -> Iterator[Progress]:
    """A progress callable for ``what`` (a command's name) on ``stream`` (stderr), for the block's duration."""
    stream = stream or sys.stderr
    if quiet:
        yield no_progress
    elif not stream.isatty():
        yield _Lines(what, stream, delay_s)
    else:
        bar = _Bar(what, stream, delay_s)
        try:
            yield bar
        finally:
            bar.close()
