"""Turning exceptions into one line on stderr and restic's exit codes.

Exit codes: 0 ok, 1 fatal (usage errors included, as restic's), 2 internal error
(a bug: what restic's Go runtime errors exit with), 3 some files could not be read,
10 no repository, 11 lock failed, 12 wrong password, 130 interrupted.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable

import click

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_INTERNAL = 2
EXIT_PARTIAL = 3
EXIT_NO_REPOSITORY = 10
EXIT_LOCK_FAILED = 11
EXIT_WRONG_PASSWORD = 12
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A command was used wrongly in a way click cannot see (exit 1)."""

    exit_code = EXIT_FATAL


def print_error(message: str, *, as_json: bool, code: int | None = None, **fields: object) -> None:
    """One line on stderr: ``cairn: message`` as text; with ``--json`` restic's
    ``{"message_type": "exit_error", "code", "message"}`` when ``code`` is given (the
    command ends with it), else an ``error`` message with ``fields`` (``during`` …)."""
    if not as_json:
        print(f"cairn: {message}", file=sys.stderr)
        return
    if code is not None:
        line: dict[str, object] = {"message_type": "exit_error", "code": code, "message": message}
    else:
        line = {"message_type": "error", "error": {"message": message}}
    print(json.dumps({**line, **fields}), file=sys.stderr)


def _unwrap(exc: BaseException) -> BaseException:
    """The user-relevant exception inside exception groups and stage wrappers."""
    from cairn.pipeline.errors import StageError

    while True:
        if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
            continue
        if isinstance(exc, StageError) and isinstance(exc.__cause__, BaseException):
            exc = exc.__cause__  # a stage failed: what failed is what the user sees
            continue
        inner = getattr(exc, "user_error", None)
        if isinstance(inner, BaseException) and inner is not exc:
            exc = inner
            continue
        return exc


def describe(exc: BaseException, *, debug: bool = False) -> tuple[int, str]:
    """The exit code and the one-line message (without ``cairn: ``) for a failure."""
    err = _unwrap(exc)
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    code = getattr(err, "exit_code", None)
    if isinstance(code, int):
        return code, str(err)
    if isinstance(err, OSError):
        return EXIT_FATAL, f"{err.strerror or err}: {err.filename or ''}".rstrip(": ")
    # An exception nobody anticipated is a bug: restic exits 2 on a Go runtime
    # error (a panic), so scripts can tell "cairn broke" from "the job failed".
    return EXIT_INTERNAL, f"internal error: {type(err).__name__}: {err}"


def _usage_message(exc: click.ClickException) -> str:
    """One line for a usage error (restic prints one, without the usage text):
    click's message, and where to read about the command."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


ExitHook = Callable[[int, "str | None"], None]


def run_cli(group: click.Group, args: list[str], on_exit: ExitHook | None = None) -> int:
    """Run the click group; every failure becomes one line and an exit code.

    ``on_exit(code, error)`` is called last (the CLI logs ``command.finished`` or
    ``command.failed`` there); ``error`` is the one-line message or None.
    """
    code, error = _run(group, args)
    if on_exit is not None:
        on_exit(code, error)
    return code


def _run(group: click.Group, args: list[str]) -> tuple[int, str | None]:
    debug = "--debug" in args
    as_json = "--json" in args
    try:
        result = group.main(args=args, prog_name="cairn", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code), None
    except click.ClickException as exc:
        # click's usage errors carry 2; restic (cobra) exits 1 for them, and so do we.
        code = EXIT_FATAL if exc.exit_code == 2 else int(exc.exit_code)
        message = _usage_message(exc)
        print_error(message, as_json=as_json, code=code)
        return code, message
    except (KeyboardInterrupt, click.exceptions.Abort):
        print_error("interrupted", as_json=as_json, code=EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED, "interrupted"
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            if isinstance(exc.code, str):
                return EXIT_FATAL, exc.code
            return int(exc.code or 0), None
        code, message = describe(exc)
        if debug and code != EXIT_INTERRUPTED:
            traceback.print_exception(exc)
        hint = message.startswith("internal error") and not debug
        if as_json:
            extra = {"hint": "run with --debug for the traceback"} if hint else {}
            print_error(message, as_json=True, code=code, **extra)
        else:
            print_error(message, as_json=False)
            if hint:
                print("cairn: run with --debug for the traceback", file=sys.stderr)
        return code, message
    return (result if isinstance(result, int) else EXIT_OK), None
