"""structlog configuration for one run: format, destination, level and run context.

Every event carries the run context — ``run_id``, ``command``, ``host``, ``profile``
and, once the repository is open, ``repository`` (its config id). The context is a
process-wide dict rather than contextvars: events logged after ``anyio.run`` returns
(``backup.finished``) or in worker threads must carry it too. Events from worker
processes come back through :mod:`cairn.pipeline.worklog`; stdlib ``logging``
records (asyncssh, botocore) are rendered into the same stream.
``docs/logging.md`` is the catalogue of events.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
import uuid
from typing import Any, TextIO

import structlog

from cairn.config.settings import Settings
from cairn.pipeline import worklog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_FIRST = ("timestamp", "level", "event", "logger")

#: Fields added to every event of this run.
RUN_CONTEXT: dict[str, Any] = {}
_state: dict[str, Any] = {"console_on_stderr": True, "started": time.monotonic()}


def log_level(settings: Settings) -> int:
    """``--log-level`` if given; else debug for ``--debug``/``-vv``, info for ``-v`` or a
    log file, error for ``-q``, warning otherwise."""
    if settings.log_level:
        return _LEVELS[settings.log_level]
    if settings.debug or settings.verbosity >= 2:
        return logging.DEBUG
    if settings.verbosity == 1 or settings.log_file:
        return logging.INFO
    if settings.quiet:
        return logging.ERROR
    return logging.WARNING


class _Writer:
    """One rendered line per event, whole lines under a lock (threads log too).

    Writing to stderr looks ``sys.stderr`` up each time so that rich's live
    progress display, which redirects it, keeps log lines above the bars.
    """

    _lock = threading.Lock()

    def __init__(self, file: TextIO | None, name: str | None = None) -> None:
        self._file = file
        self.name = name or "cairn"

    def msg(self, message: str) -> None:
        stream = self._file or sys.stderr
        with self._lock:
            stream.write(message + "\n")
            stream.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _WriterFactory:
    def __init__(self, file: TextIO | None) -> None:
        self.file = file

    def __call__(self, *args: Any) -> _Writer:
        return _Writer(self.file, str(args[0]) if args else None)


def _add_logger_name(logger: Any, _method: str, event_dict: Any) -> Any:
    record = event_dict.get("_record")  # a stdlib record from a library
    name = record.name if record is not None else getattr(logger, "name", "cairn")
    event_dict.setdefault("logger", name)
    return event_dict


def _add_run_context(_logger: Any, _method: str, event_dict: Any) -> Any:
    for key, value in RUN_CONTEXT.items():
        event_dict.setdefault(key, value)
    return event_dict


def _order(_logger: Any, _method: str, event_dict: Any) -> Any:
    """timestamp, level, event, logger, then the run context, then the event's fields."""
    first = {k: event_dict.pop(k) for k in (*_FIRST, *RUN_CONTEXT) if k in event_dict}
    return {**first, **event_dict}


_log_file: TextIO | None = None


# Per-entry problems the CLI prints itself as ``warning: PATH: PROBLEM`` lines at the
# end of the run (cli/common.py: report_item_errors). A console log on the same stderr
# would say each twice; JSON, logfmt and log files keep the events.
PRINTED_ITEM_EVENTS = frozenset(
    {"backup.file_error", "restore.file_error", "copy.snapshot_failed"}
)


def _drop_printed_item_errors(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    if event.get("event") in PRINTED_ITEM_EVENTS:
        raise structlog.DropEvent
    return event


def configure_logging(
    settings: Settings, command: str | None = None, *, run_id: str | None = None
) -> None:
    """Logs go to stderr (or ``--log-file``), as console text, JSON lines or logfmt.

    ``run_id`` keeps the id of a run that reconfigures (``cairn run`` applies its
    profile's log settings).
    """
    global _log_file
    level = log_level(settings)
    if _log_file is not None:
        _log_file.close()
        _log_file = None
    if settings.log_file:
        _log_file = open(settings.log_file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
    fmt = settings.log_format
    if (
        settings.json
        and not settings.log_file
        and settings.sources.get("log_format")
        in (
            None,
            "default",
        )
    ):
        fmt = "json"  # --json: every line on stderr is JSON too
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_run_context,
        _order,
    ]
    renderer: Any
    if fmt == "json":
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer(default=str)
    elif fmt == "logfmt":
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.LogfmtRenderer(key_order=list(_FIRST))
    else:
        colors = _log_file is None and sys.stderr.isatty()
        # Plain tracebacks (with --debug), whether or not rich is installed:
        # early.import_structlog() keeps structlog from loading it.
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback
        )
        if _log_file is None:
            shared.append(_drop_printed_item_errors)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_WriterFactory(_log_file),
        cache_logger_on_first_use=False,
    )
    _route_stdlib(shared, renderer, level)
    worklog.set_level(level)
    _state["console_on_stderr"] = _log_file is None and fmt == "console"
    RUN_CONTEXT.clear()
    RUN_CONTEXT.update(
        run_id=run_id or uuid.uuid4().hex[:12],
        command=command or "",
        repository=None,
        host=socket.gethostname(),
        profile=settings.profile,
    )


def _route_stdlib(shared: list[Any], renderer: Any, level: int) -> None:
    """Library records (asyncssh, botocore …) through the same renderer and stream."""
    handler = logging.StreamHandler(_log_file or _StderrProxy())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                p for p in shared if p is not structlog.contextvars.merge_contextvars
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_cairn", False)]:
        root.removeHandler(old)
    handler._cairn = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    # Libraries are chatty at info; only their warnings unless we debug.
    root.setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))


class _StderrProxy:
    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def set_command(command: str) -> None:
    """Name the running command in the run context (``run`` renames its steps)."""
    RUN_CONTEXT["command"] = command


def bind_repository(repo_id: str | None) -> None:
    """Add the opened repository's id to every later event."""
    RUN_CONTEXT["repository"] = repo_id


def note_error(message: str) -> None:
    """The error ``command.failed`` reports when the command returns a code itself
    (``cairn run``: the first failing step's message)."""
    _state.setdefault("error", message)


def log_exit(code: int, error: str | None) -> None:
    """``command.finished`` (info) or ``command.failed`` (error) with the exit code.

    A failure's message already went to stderr as one line; on a plain console
    log on stderr it is not repeated.
    """
    if not RUN_CONTEXT:
        return  # logging was never configured (usage error before the command)
    log = structlog.get_logger("cairn.cli")
    seconds = round(time.monotonic() - _state["started"], 3)
    if code in (0, 3):
        log.info("command.finished", exit_code=code, duration=seconds)
    elif not _state["console_on_stderr"]:
        error = error or _state.get("error") or f"exit code {code}"
        log.error("command.failed", exit_code=code, error=error, duration=seconds)
    if _log_file is not None:
        _log_file.flush()
