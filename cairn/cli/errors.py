"""Turning exceptions into one line on stderr and restic's exit codes.

Exit codes: 0 ok, 1 fatal, 3 some files could not be read, 10 no repository,
11 lock failed, 12 wrong password, 130 interrupted.
"""

from __future__ import annotations

import sys
import traceback

import click

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_PARTIAL = 3
EXIT_NO_REPOSITORY = 10
EXIT_LOCK_FAILED = 11
EXIT_WRONG_PASSWORD = 12
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A command was used wrongly in a way click cannot see (exit 1)."""

    exit_code = EXIT_FATAL


def _unwrap(exc: BaseException) -> BaseException:
    """The user-relevant exception inside exception groups and stage wrappers."""
    while True:
        if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
            continue
        inner = getattr(exc, "user_error", None)
        if isinstance(inner, BaseException) and inner is not exc:
            exc = inner
            continue
        return exc


def run_cli(group: click.Group, args: list[str]) -> int:
    """Run the click group; every failure becomes one line and an exit code."""
    debug = "--debug" in args
    try:
        result = group.main(args=args, prog_name="cairn", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return EXIT_FATAL if exc.exit_code == 2 else int(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("cairn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_FATAL
        err = _unwrap(exc)
        if isinstance(err, KeyboardInterrupt):
            print("cairn: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        code = getattr(err, "exit_code", None)
        if debug:
            traceback.print_exception(exc)
        if isinstance(code, int):
            print(f"cairn: {err}", file=sys.stderr)
            return code
        if isinstance(err, OSError):
            print(
                f"cairn: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr
            )
            return EXIT_FATAL
        print(f"cairn: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        if not debug:
            print("cairn: run with --debug for the traceback", file=sys.stderr)
        return EXIT_FATAL
    return result if isinstance(result, int) else EXIT_OK
