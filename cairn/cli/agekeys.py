"""age recipients and identities on the command line (``init``, ``key add``, ``key recover``).

Parsing is ``cairn.repo.recovery``'s; this module turns its errors into click usage
errors naming the option, reads identity files (``-`` is stdin), and answers age
plugins' questions on the terminal.
"""

from __future__ import annotations

import getpass
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def _parse_recipients(
    ctx: click.Context, param: click.Parameter, values: Sequence[str]
) -> list[Any]:
    from cairn.repo.age import BadRecipient, parse_recipient

    out = []
    for value in values:
        try:
            out.append(parse_recipient(value))
        except BadRecipient as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
    return out


def _parse_recipient_files(
    ctx: click.Context, param: click.Parameter, values: Sequence[str]
) -> list[Any]:
    from cairn.repo.age import BadRecipient

    out = []
    for path in values:
        try:
            out += read_recipients_file(path)
        except BadRecipient as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
    return out


def read_recipients_file(path: str) -> list[Any]:
    """The recipients in an age recipients file; ``BadRecipient`` naming file and line."""
    from cairn.repo.age import BadRecipient, parse_recipients_file

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise BadRecipient(f"cannot read recipients file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise BadRecipient(f"recipients file {path}: not UTF-8 text") from None
    return parse_recipients_file(text, f"recipients file {path}")


def recipient_options(func: F) -> F:
    """``--recipient`` (repeatable) and ``--recipients-file`` (repeatable), parsed and
    checked before the command runs: a malformed one is a usage error naming it."""
    func = click.option(
        "--recipients-file",
        "recipients_files",
        multiple=True,
        metavar="FILE",
        callback=_parse_recipient_files,
        help="Escrow the key to the recipients in FILE (age's format: one per line, "
        "# comments; age1… keys and SSH public keys). Repeatable.",
    )(func)
    func = click.option(
        "--recipient",
        "recipients",
        multiple=True,
        metavar="RECIPIENT",
        callback=_parse_recipients,
        help="Escrow the repository key to this age recipient (age1…, an age plugin's "
        "age1NAME1…, or an SSH public key 'ssh-ed25519 AAAA…'). Repeatable.",
    )(func)
    return func


def profile_recipients(settings: Any) -> list[Any]:
    """The selected profile's ``recovery_recipients`` and ``recovery_recipients_file``
    (the profile's values were checked when it was read; the file is read now)."""
    from cairn.repo.age import parse_recipient

    job = settings.job
    if job is None:
        return []
    out = [parse_recipient(text) for text in job.get("recovery_recipients") or []]
    path = job.get("recovery_recipients_file")
    if path:
        out += read_recipients_file(path)
    return out


def _never_raises(func: F) -> F:
    """pyrage turns an exception in a callback into a Rust panic: answer None instead."""

    def wrapper(*args: Any) -> Any:
        try:
            return func(*args)
        except (Exception, KeyboardInterrupt):
            return None

    return wrapper  # type: ignore[return-value]


class TerminalCallbacks:
    """age plugin callbacks (``age-plugin-yubikey`` asks for a PIN, a touch …): on the
    terminal when there is one, declined otherwise."""

    @_never_raises
    def display_message(self, message: str) -> None:
        print(message, file=sys.stderr)

    @_never_raises
    def confirm(self, message: str, yes_string: str, no_string: str | None) -> bool | None:
        if not sys.stdin.isatty():
            return None
        choices = f"{yes_string}/{no_string}" if no_string else yes_string
        answer = input(f"{message} [{choices}]: ").strip()
        return answer == yes_string if no_string else True

    @_never_raises
    def request_public_string(self, description: str) -> str | None:
        return input(f"{description}: ") if sys.stdin.isatty() else None

    @_never_raises
    def request_passphrase(self, description: str) -> str | None:
        return getpass.getpass(f"{description}: ") if sys.stdin.isatty() else None


def read_identities(path: str) -> list[Any]:
    """The age identities in ``path`` (``-``: standard input); one-line errors."""
    from cairn.repo.age import BadIdentity, parse_identities

    if path == "-":
        data, source = sys.stdin.buffer.read(), "(standard input)"
    else:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise BadIdentity(f"cannot read identity file {path}: {exc.strerror}") from None
        source = path
    return parse_identities(data, source, TerminalCallbacks())
