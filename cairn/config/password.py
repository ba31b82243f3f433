"""Where the repository password comes from: file, command, environment or a prompt."""

from __future__ import annotations

import getpass
import shlex
import subprocess
import sys

from cairn.config.settings import Settings


class PasswordError(Exception):
    """No password could be obtained; the message says from where it was tried."""

    exit_code = 1


def _from_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise PasswordError(f"cannot read password file {path}: {exc.strerror}") from exc
    return text.rstrip("\r\n")


def _from_command(command: str) -> str:
    try:
        proc = subprocess.run(shlex.split(command), capture_output=True, check=False, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PasswordError(f"password command {command!r} failed: {exc}") from exc
    if proc.returncode != 0:
        raise PasswordError(f"password command {command!r} exited with status {proc.returncode}")
    return proc.stdout.decode("utf-8").rstrip("\r\n")


def _prompt(text: str) -> str:
    if not sys.stdin.isatty():
        raise PasswordError(
            "no password given: use --password-file, --password-command or CAIRN_PASSWORD"
        )
    return getpass.getpass(text)


def read_password(settings: Settings, *, prompt: str = "enter password for repository: ") -> str:
    """The repository password, in restic's order of sources."""
    if settings.password_file:
        password = _from_file(settings.password_file)
    elif settings.password_command:
        password = _from_command(settings.password_command)
    elif "CAIRN_PASSWORD" in settings.env:
        password = settings.env["CAIRN_PASSWORD"]
    else:
        password = _prompt(prompt)
    if not password:
        raise PasswordError("an empty password is not allowed")
    return password


def read_new_password(
    settings: Settings, new_password_file: str | None = None, *, what: str = "new password"
) -> str:
    """A new password: from ``--new-password-file``, or asked twice on a terminal.

    Without a new-password file or a terminal, ``init`` falls back to the normal
    sources (that is how scripted ``init`` works in restic too).
    """
    if new_password_file:
        password = _from_file(new_password_file)
    elif sys.stdin.isatty() and not (
        settings.password_file or settings.password_command or "CAIRN_PASSWORD" in settings.env
    ):
        password = getpass.getpass(f"enter {what}: ")
        if getpass.getpass(f"enter {what} again: ") != password:
            raise PasswordError("passwords do not match")
    else:
        password = read_password(settings)
    if not password:
        raise PasswordError("an empty password is not allowed")
    return password
