"""structlog configuration for one run: format, destination and level from the flags."""

from __future__ import annotations

import logging
import sys
import uuid
from typing import Any, TextIO

import structlog

from cairn.config.settings import Settings


def configure_logging(settings: Settings, command: str | None = None) -> None:
    """Logs go to stderr (or ``--log-file``), as console text, JSON lines or logfmt.

    Default level is warning; ``-v`` info, ``-vv`` debug. A log file gets info and
    up even without ``-v`` — that is what it is for.
    """
    if settings.debug or settings.verbosity >= 2:
        level = logging.DEBUG
    elif settings.verbosity == 1 or settings.log_file:
        level = logging.INFO
    elif settings.quiet:
        level = logging.ERROR
    else:
        level = logging.WARNING
    stream: TextIO = sys.stderr
    if settings.log_file:
        stream = open(settings.log_file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
    fmt = settings.log_format
    renderer: Any
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    elif fmt == "logfmt":
        renderer = structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"])
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(
        run_id=uuid.uuid4().hex[:12], command=command or "", repository=settings.repo or ""
    )
