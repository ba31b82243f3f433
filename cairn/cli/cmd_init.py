"""``cairn init``: create a repository."""

from __future__ import annotations

from typing import Any

import click

from cairn.backends.location import redact_location
from cairn.cli.agekeys import TerminalCallbacks, profile_recipients, recipient_options
from cairn.cli.common import echo_json, hostname, kdf_params, open_backend, run_async, username
from cairn.config.password import read_new_password
from cairn.config.settings import Settings


@click.command("init")
@recipient_options
@click.pass_obj
def command(settings: Settings, recipients: list[Any], recipients_files: list[Any]) -> None:
    """Create a new repository at -r/--repo.

    With --recipient/--recipients-file (or the profile's recovery_recipients) the
    repository key is also escrowed to those age recipients from the start: see
    `cairn key --help`.
    """
    from cairn.repo.repository import init_repository

    everyone = [*recipients, *recipients_files] or profile_recipients(settings)
    backend, _ = open_backend(settings)
    password = read_new_password(settings, what="password for the new repository")

    async def main() -> str:
        try:
            repo = await init_repository(
                backend,
                password,
                kdf_params=kdf_params(settings),
                hostname=hostname(),
                username=username(),
                recipients=everyone,
                callbacks=TerminalCallbacks(),
            )
            return str(repo.config.id)
        finally:
            await backend.aclose()

    repo_id = run_async(main)
    location = redact_location(settings.repository() or "")  # a URL's password stays hidden
    if settings.json:
        line = {"message_type": "initialized", "id": repo_id, "repository": location}
        echo_json(line | {"recovery_recipients": [r.text for r in everyone]})
    elif not settings.quiet:
        click.echo(f"created cairn repository {repo_id[:10]} at {location}")
        if everyone:
            click.echo(
                f"The repository key is escrowed to {len({r.text for r in everyone})} age "
                "recipient(s): their identities can recover it with `cairn key recover`."
            )
        else:
            click.echo(
                "Please note that knowledge of your password is required to access the "
                "repository. Losing your password means that your data is irrecoverably "
                "lost."
            )
