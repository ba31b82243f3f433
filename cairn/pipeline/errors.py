"""Exceptions raised by the engine and the exit codes the CLI maps them to."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: restic's exit code for an interrupted run (128 + SIGINT).
EXIT_INTERRUPTED = 130


def _rebuild(cls: type[BaseException], args: tuple, state: dict) -> BaseException:
    # The engine imports nothing from the rest of cairn, so this mirrors
    # ``cairn.backends.base.rebuild_error``.
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class PipelineError(Exception):
    """Base class for errors raised by the engine itself.

    Every subclass pickles with its class, message and attributes (errors travel
    back from worker processes), whatever its ``__init__`` takes.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class StageError(PipelineError):
    """A stage failed on one item; the original exception is ``__cause__``.

    ``item`` is the stage's input item (``None`` for sources and sinks that
    failed outside an item). The first StageError cancels the whole pipeline.
    """

    def __init__(self, stage: str, item: Any, cause: BaseException) -> None:
        self.stage = stage
        self.item = item
        super().__init__(f"stage {stage!r} failed on {_short(item)}: {cause!r}")
        self.__cause__ = cause

    def __reduce__(self) -> tuple[Any, ...]:
        cause = self.__cause__ if self.__cause__ is not None else Exception("unknown")
        return (type(self), (self.stage, self.item, cause), self.__dict__)


@contextmanager
def raising_causes() -> Iterator[None]:
    """Around ``await pipeline.run()``: a failed stage is raised as what failed in it
    (a command's callers handle its own errors, not the engine's wrapper)."""
    try:
        yield
    except StageError as exc:
        cause = exc.__cause__
        if isinstance(cause, Exception):
            raise cause from cause.__cause__
        raise


class WorkerCrashed(PipelineError):
    """A worker process died while running a job (killed, out of memory, segfault)."""


class RemoteError(PipelineError):
    """A worker raised an exception that could not be pickled back; carries its text."""


class Interrupted(PipelineError):
    """The run was stopped by SIGINT or SIGTERM; the CLI exits with ``exit_code``."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def exit_code_for(exc: BaseException) -> int | None:
    """Exit code for an interruption (Interrupted or KeyboardInterrupt), else None."""
    if isinstance(exc, Interrupted | KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, StageError) and exc.__cause__ is not None:
        return exit_code_for(exc.__cause__)
    return None


def _short(item: Any, limit: int = 120) -> str:
    # Items can be large (bytes of a file piece); keep messages one line.
    text = repr(item)
    return text if len(text) <= limit else text[: limit - 3] + "..."
