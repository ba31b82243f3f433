"""``cairn key list|add|remove|passwd``: manage the keys that open a repository."""

from __future__ import annotations

from typing import Any

import click

from cairn.cli.common import echo_json, hostname, kdf_params, open_repo, run_async, username
from cairn.config.password import PasswordError, read_new_password
from cairn.config.settings import Settings


@click.group("key")
def command() -> None:
    """Manage the keys (passwords) of a repository."""


def _new_password(settings: Settings, new_password_file: str | None) -> str:
    import sys

    if not new_password_file and not sys.stdin.isatty():
        raise PasswordError("no new password given: use --new-password-file")
    return read_new_password(settings, new_password_file, what="new password")


@command.command("list")
@click.pass_obj
def key_list(settings: Settings) -> None:
    """List the keys of the repository; * marks the one in use."""

    async def main() -> list[dict[str, Any]]:
        async with open_repo(settings) as repo:
            keys: list[dict[str, Any]] = await repo.list_keys()
            for key in keys:
                key["current"] = key["id"] == repo.key_id
            return keys

    keys = run_async(main)
    if settings.json:
        echo_json(keys)
        return
    click.echo(f" {'ID':<10}  {'User':<12}  {'Host':<20}  Created")
    click.echo("-" * 64)
    for key in keys:
        mark = "*" if key["current"] else " "
        click.echo(
            f"{mark}{key['id'][:8]:<10}  {key.get('username', ''):<12}  "
            f"{key.get('hostname', ''):<20}  {key.get('created', '')}"
        )


@command.command("add")
@click.option("--new-password-file", help="File holding the new password.")
@click.option("--host", "host", help="Host name to record in the key.")
@click.option("--user", "user", help="User name to record in the key.")
@click.pass_obj
def key_add(
    settings: Settings, new_password_file: str | None, host: str | None, user: str | None
) -> None:
    """Add a new key (password) to the repository."""
    new_password = _new_password(settings, new_password_file)

    async def main() -> str:
        async with open_repo(settings) as repo:
            key_id: str = await repo.add_key(
                new_password,
                hostname=host or hostname(),
                username=user or username(),
                kdf_params=kdf_params(settings),
            )
            return key_id

    key_id = run_async(main)
    if settings.json:
        echo_json({"message_type": "key_added", "id": key_id})
    else:
        click.echo(f"saved new key as {key_id[:8]}")


@command.command("remove")
@click.argument("key_id")
@click.pass_obj
def key_remove(settings: Settings, key_id: str) -> None:
    """Remove a key; refuses the key in use and the last key."""

    async def main() -> str:
        async with open_repo(settings) as repo:
            full: str = await repo.find_id("keys", key_id)
            await repo.remove_key(full)
            return full

    removed = run_async(main)
    if settings.json:
        echo_json({"message_type": "key_removed", "id": removed})
    else:
        click.echo(f"removed key {removed[:8]}")


@command.command("passwd")
@click.option("--new-password-file", help="File holding the new password.")
@click.pass_obj
def key_passwd(settings: Settings, new_password_file: str | None) -> None:
    """Change the password of the key in use (adds a new key, removes the old)."""
    new_password = _new_password(settings, new_password_file)

    async def main() -> str:
        async with open_repo(settings) as repo:
            key_id: str = await repo.change_password(
                new_password,
                hostname=hostname(),
                username=username(),
                kdf_params=kdf_params(settings),
            )
            return key_id

    key_id = run_async(main)
    if settings.json:
        echo_json({"message_type": "password_changed", "id": key_id})
    else:
        click.echo(f"saved new key as {key_id[:8]}, removed the old one")
