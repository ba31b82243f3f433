"""Log events from worker processes, carried back to the parent with each reply.

A worker configures structlog (:func:`capture`) to keep event dicts in a list
instead of writing them; every reply to the parent takes the list along
(:func:`drain`), and the parent re-emits the events through its own structlog
configuration (:func:`replay`) tagged with ``worker_pid``. So worker events land
in the same stream, format and run context as the parent's, in order with the
job that produced them, with no extra pipe, thread or file handle.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

_buffer: list[dict[str, Any]] = []
# The parent's minimum level, handed to workers so they do not ship events
# the parent would drop anyway. Set by whoever configures logging in the parent.
DEFAULT_LEVEL = logging.INFO
_level = DEFAULT_LEVEL
_PLAIN = (str, int, float, bool, type(None))


def set_level(level: int) -> None:
    """Parent side: the minimum level workers should capture."""
    global _level
    _level = level


def level() -> int:
    """Parent side: the level to pass to new workers."""
    return _level


class _Sink:
    """Stands in for a real logger in a worker; the processor chain never reaches it."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or "cairn.worker"


def _keep(logger: Any, method_name: str, event_dict: Any) -> Any:
    event_dict.setdefault("logger", getattr(logger, "name", "cairn.worker"))
    event_dict.setdefault("level", method_name)
    # Only plain values travel: a stray object must not make the job's reply unpicklable.
    _buffer.append({k: v if isinstance(v, _PLAIN) else repr(v) for k, v in event_dict.items()})
    raise structlog.DropEvent


def capture(min_level: int) -> None:
    """Worker side: buffer events of ``min_level`` and up for :func:`drain`."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _keep,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        logger_factory=_Sink,
        cache_logger_on_first_use=False,
    )


def drain() -> list[dict[str, Any]]:
    """Worker side: the events logged since the last drain."""
    global _buffer
    records, _buffer = _buffer, []
    return records


_LEVELS = {
    "critical": logging.CRITICAL,
    "exception": logging.ERROR,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}


def replay(records: list[dict[str, Any]], pid: int | None) -> None:
    """Parent side: emit worker events through the parent's structlog configuration."""
    for record in records:
        record = dict(record)
        name = str(record.pop("logger", "cairn.worker"))
        levelno = _LEVELS.get(str(record.pop("level", "info")), logging.INFO)
        event = str(record.pop("event", "worker.event"))
        record.pop("timestamp", None)
        structlog.get_logger(name).log(levelno, event, worker_pid=pid, **record)
