"""``cairn key list|add|remove|passwd|recover``: manage the keys that open a repository.

Password keys and recovery keys (the master key escrowed to age recipients; see
``cairn.repo.recovery`` and docs/format.md) live side by side in ``keys/``.
"""

from __future__ import annotations

from typing import Any

import click

from cairn.cli.agekeys import TerminalCallbacks, read_identities, recipient_options
from cairn.cli.common import echo_json, hostname, kdf_params, open_repo, run_async, username
from cairn.config.password import PasswordError, read_new_password
from cairn.config.settings import Settings


@click.group("key")
def command() -> None:
    """Manage the keys of a repository: passwords, and recovery keys.

    A recovery key escrows the repository key to an age recipient (a public key:
    age1…, an SSH public key, or an age plugin's such as a YubiKey's). Whoever holds
    the matching private identity, kept offline, can add a new password with
    `cairn key recover --identity FILE` when every password is lost; hosts that back
    up hold nothing that could do it.

    \b
      cairn init --recipient age1...              # escrow from the start
      cairn key add --recipient age1...           # or later (needs a password)
      cairn key add --recipients-file team.txt    # age recipients file, SSH keys too
      cairn key list                              # recovery keys and fingerprints
      cairn key recover --identity key.txt --new-password-file new.txt

    Identities: age-keygen files, unencrypted OpenSSH ed25519/RSA private keys, and
    age plugin identities (AGE-PLUGIN-…: age-plugin-NAME must be on PATH; pyrage's
    plugin support). A wrong identity exits 12. To rotate a recovery key, add the
    new one, then `key remove` the old one: copies of the old file taken earlier
    still open with the old identity (docs/format.md, section 5.1).
    """


def _new_password(settings: Settings, new_password_file: str | None) -> str:
    import sys

    if not new_password_file and not sys.stdin.isatty():
        raise PasswordError("no new password given: use --new-password-file")
    return read_new_password(settings, new_password_file, what="new password")


@command.command("list")
@click.pass_obj
def key_list(settings: Settings) -> None:
    """List the keys of the repository; * marks the one in use.

    Recovery keys are listed with their recipients: an age1… recipient is its own
    fingerprint; an SSH key shows OpenSSH's SHA256 fingerprint (as `ssh-keygen -l`).
    """

    async def main() -> list[dict[str, Any]]:
        async with open_repo(settings) as repo:
            keys: list[dict[str, Any]] = await repo.list_keys()
            return keys

    keys = run_async(main)
    if settings.json:
        echo_json(keys)
        return
    click.echo(f" {'ID':<10}  {'Type':<9}  {'User':<12}  {'Host':<20}  Created")
    click.echo("-" * 75)
    for key in keys:
        mark = "*" if key["current"] else " "
        click.echo(
            f"{mark}{key['id'][:8]:<10}  {key['kind']:<9}  {key.get('username', ''):<12}  "
            f"{key.get('hostname', ''):<20}  {key.get('created', '')}"
        )
        if "error" in key:
            click.echo(f"    {key['error']}")
        for r in key.get("recipients", []):
            shown = r["fingerprint"] if r["type"] == "x25519" else f"{r['type']} {r['fingerprint']}"
            click.echo(f"    recipient {shown}")
        if key.get("verified") is False:
            click.echo("    warning: this file was not written by a holder of the repository key")


@command.command("add")
@click.option("--new-password-file", help="File holding the new password.")
@recipient_options
@click.option(
    "--if-missing",
    is_flag=True,
    help="With --recipient: add nothing if a recovery key for exactly these recipients "
    "exists already (for scripts and `cairn run`).",
)
@click.option("--host", "host", help="Host name to record in the key.")
@click.option("--user", "user", help="User name to record in the key.")
@click.pass_obj
def key_add(
    settings: Settings,
    new_password_file: str | None,
    recipients: list[Any],
    recipients_files: list[Any],
    if_missing: bool,
    host: str | None,
    user: str | None,
) -> None:
    """Add a new key (password) to the repository, or with --recipient a recovery key.

    A recovery key needs no new password: the repository key is encrypted with age
    to the recipients, and `cairn key recover` with a matching identity unwraps it.
    """
    everyone = [*recipients, *recipients_files]
    if everyone:
        if new_password_file:
            raise click.UsageError("--new-password-file and --recipient exclude each other")
        _add_recovery_key(settings, everyone, if_missing, host, user)
        return
    if if_missing:
        raise click.UsageError("--if-missing goes with --recipient or --recipients-file")
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


def _add_recovery_key(
    settings: Settings, recipients: list[Any], if_missing: bool, host: str | None, user: str | None
) -> None:
    async def main() -> tuple[str, bool]:
        async with open_repo(settings) as repo:
            if if_missing:
                existing = await repo.find_recovery_key(recipients)
                if existing is not None:
                    return existing, True
            key_id: str = await repo.add_recovery_key(
                recipients,
                hostname=host or hostname(),
                username=user or username(),
                callbacks=TerminalCallbacks(),
            )
            return key_id, False

    key_id, existed = run_async(main)
    if settings.json:
        echo_json(
            {"message_type": "key_added", "id": key_id, "kind": "recovery", "existing": existed}
        )
    elif existed:
        if not settings.quiet:  # `cairn run` says it every night: -q keeps cron quiet
            click.echo(f"recovery key {key_id[:8]} already escrows to these recipients")
    else:
        count = len({r.text for r in recipients})
        click.echo(f"saved new recovery key as {key_id[:8]} ({count} recipient(s))")


@command.command("remove")
@click.argument("key_id")
@click.pass_obj
def key_remove(settings: Settings, key_id: str) -> None:
    """Remove a key (password or recovery); refuses the key in use and the last key."""

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


@command.command("recover")
@click.option(
    "--identity",
    "identity",
    required=True,
    metavar="FILE",
    help="age identity file (age-keygen's, an OpenSSH private key, or an age plugin's "
    "AGE-PLUGIN-… lines); - reads standard input.",
)
@click.option("--new-password-file", help="File holding the new password.")
@click.option("--host", "host", help="Host name to record in the new key.")
@click.option("--user", "user", help="User name to record in the new key.")
@click.pass_obj
def key_recover(
    settings: Settings,
    identity: str,
    new_password_file: str | None,
    host: str | None,
    user: str | None,
) -> None:
    """Add a new password key, opening the repository with a recovery key's identity.

    No password is needed. Nothing else in the repository changes: the recovery key
    stays, and so do any password keys.
    """
    identities = read_identities(identity)
    if identity == "-" and not new_password_file:
        raise click.UsageError("--identity - reads standard input: give --new-password-file")
    new_password = _new_password(settings, new_password_file)

    async def main() -> tuple[str, str]:
        async with open_repo(settings, identities=identities) as repo:
            key_id: str = await repo.add_key(
                new_password,
                hostname=host or hostname(),
                username=user or username(),
                kdf_params=kdf_params(settings),
            )
            return key_id, str(repo.key_id)

    key_id, recovery_id = run_async(main)
    if settings.json:
        echo_json({"message_type": "key_recovered", "id": key_id, "recovery_key": recovery_id})
    else:
        click.echo(f"saved new key as {key_id[:8]} (recovered with recovery key {recovery_id[:8]})")
