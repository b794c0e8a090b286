"""Terminal output for long-running work: rich progress on the real terminal, native noise captured.

TensorFlow, onnx2tf and the TFLite converter print from C++ straight to file descriptors 1 and 2.
To keep the terminal readable, :func:`captured_native_output` points those descriptors at a log file
while a stage runs; the rich console writes to a duplicate of the original stderr, so progress stays
visible. The captured log is kept so a failing stage can quote it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# Width when the output goes to a file or pipe (CI logs, `2> log`): rich's default there, 80 columns,
# cuts the layer tables' columns to "…". A terminal keeps its own width; COLUMNS still wins.
LOG_WIDTH = 120


def _terminal_stream():
    try:
        return os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    except (OSError, ValueError, AttributeError):
        return sys.stderr


def _console() -> Console:
    stream = _terminal_stream()
    width = None if "COLUMNS" in os.environ or (hasattr(stream, "isatty") and stream.isatty()) else LOG_WIDTH
    return Console(file=stream, highlight=False, width=width)


@dataclass
class Reporter:
    """Where progress and messages go. ``quiet`` silences everything but errors; ``verbose`` lets
    TF/onnx2tf logs through."""

    quiet: bool = False
    verbose: bool = False
    console: Console = field(default_factory=_console)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"[yellow]warning:[/yellow] {message}")

    @contextlib.contextmanager
    def progress(self) -> Iterator[Progress]:
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            disable=self.quiet,
            transient=False,
        )
        with progress:
            try:
                yield progress
            except BaseException:
                # A failed run ends with its one-line error, not a half-finished bar above it.
                for task in list(progress.task_ids):
                    progress.remove_task(task)
                progress.live.transient = True
                raise


class NativeLog:
    """What native code printed while captured; readable while the capture is still on."""

    def __init__(self, file=None) -> None:
        self._file = file
        self._text = ""

    def text(self) -> str:
        if self._file is None:
            return self._text
        sys.stdout.flush()
        sys.stderr.flush()
        self._file.seek(0)
        return self._file.read().decode("utf-8", "replace")

    def close(self) -> None:
        if self._file is not None:
            self._text = self.text()
            self._file = None


@contextlib.contextmanager
def captured_native_output(enabled: bool = True) -> Iterator[NativeLog]:
    """Point fds 1 and 2 at a temp file while the block runs (no-op when ``enabled`` is false)."""
    if not enabled:
        yield NativeLog()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as fh:
        log = NativeLog(fh)
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield log
        finally:
            log.close()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
