"""Signal handling from the first instant of the ``cairn`` process.

Loading the CLI's modules takes a few hundred milliseconds; a SIGTERM in that time
used to kill the process with the default action (exit status 143) instead of
cairn's documented 130. This module imports nothing heavy: the entry point installs
handlers that only *record* SIGINT/SIGTERM while the rest loads (raising
``KeyboardInterrupt`` in the middle of an import would end in a traceback), then
:func:`interrupt_on_signals` turns a recorded signal, or any later one, into
``KeyboardInterrupt`` — which the CLI reports as ``cairn: interrupted``, exit 130.
While a command runs its async part, :mod:`cairn.pipeline.signals` takes over.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

_STOP = (signal.SIGINT, signal.SIGTERM)
_pending: list[int] = []


def _record(signum: int, _frame: FrameType | None) -> None:
    _pending.append(signum)


def _raise(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def install() -> None:
    """Record SIGINT/SIGTERM until :func:`interrupt_on_signals` is called."""
    for sig in _STOP:
        signal.signal(sig, _record)


def interrupt_on_signals() -> None:
    """From now on SIGINT/SIGTERM raise ``KeyboardInterrupt``; one that arrived while
    loading raises it at once."""
    for sig in _STOP:
        signal.signal(sig, _raise)
    if _pending:
        raise KeyboardInterrupt


def import_structlog() -> None:
    """Import structlog without rich: when rich is installed structlog imports it
    (and rich, attrs) at once, only to offer rich tracebacks, which cairn's
    renderers do not use (logsetup.py) — about 70 ms of CPU and 5 MiB on every
    run, a tenth of a no-change backup. rich itself loads later, and only for
    the progress display on a terminal."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # makes "import rich" fail
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


def main() -> None:
    """Console-script entry point: handlers first, then load and run the CLI."""
    install()
    import_structlog()
    from cairn.cli.main import main as run

    run(sys.argv[1:])
