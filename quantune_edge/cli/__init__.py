"""The quantune-edge command line (typer + rich), thin over the Python API: one module per command
group, and ``shared`` for what they all do (one-line errors, --json, option types)."""
from __future__ import annotations

import signal
import sys

from quantune_edge.cli import analyze, compile, devices, run, tune  # noqa: F401 (each registers its commands)
from quantune_edge.cli.shared import app

__all__ = ["app", "main"]


class Interrupted(KeyboardInterrupt):
    """SIGTERM (what ``timeout`` and CI cancellation send) handled as SIGINT is: every ``finally``
    and staging clean-up runs, so a killed command leaves nothing half-written."""


def _interrupt(signum: int, _frame) -> None:
    _interrupt.signum = signum  # type: ignore[attr-defined]
    raise Interrupted(signal.Signals(signum).name)


def main() -> None:
    _interrupt.signum = None  # type: ignore[attr-defined]
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        app()
    except SystemExit:
        signum = _interrupt.signum  # type: ignore[attr-defined]
        if signum is None:
            raise
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "quantune-edge")
        sys.stderr.write(f"error: {command} interrupted ({signal.Signals(signum).name}); nothing half-written was left, "
                         "and earlier outputs are as they were\n")
        sys.exit(128 + signum)

