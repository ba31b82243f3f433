"""Turn SIGINT/SIGTERM into a clean stop: cancel the work, then raise Interrupted."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from .errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@asynccontextmanager
async def stop_on_signals(
    signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
) -> AsyncIterator[None]:
    """Run the body; on the first of ``signals`` cancel it and raise :class:`Interrupted`.

    Cancellation unwinds every ``finally`` (workers stopped, slots unlinked)
    before Interrupted propagates, and the CLI maps it to exit code 130.
    Must be entered from the main thread (signal handlers live there).
    """
    received: list[int] = []
    try:
        with anyio.open_signal_receiver(*signals) as incoming:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    async for signum in incoming:
                        received.append(signum)
                        tg.cancel_scope.cancel()
                        return

                tg.start_soon(watch)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()  # the body finished: stop watching
    except Exception as exc:
        # A signal sent to the whole process group also reaches children that
        # are starting (the fork server before it ignores SIGINT: "EOFError:
        # unexpected EOF" from the process start): what fails after the stop was
        # asked for is part of the stop, not an error of its own.
        if received:
            raise Interrupted(received[0]) from exc
        raise
    if received:
        raise Interrupted(received[0])
