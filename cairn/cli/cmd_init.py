"""``cairn init``: create a repository."""

from __future__ import annotations

import click

from cairn.backends.location import redact_location
from cairn.cli.common import echo_json, hostname, kdf_params, open_backend, run_async, username
from cairn.config.password import read_new_password
from cairn.config.settings import Settings


@click.command("init")
@click.pass_obj
def command(settings: Settings) -> None:
    """Create a new repository at -r/--repo."""
    from cairn.repo.repository import init_repository

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
            )
            return str(repo.config.id)
        finally:
            await backend.aclose()

    repo_id = run_async(main)
    location = redact_location(settings.repo or "")  # a URL's password stays off the screen
    if settings.json:
        echo_json({"message_type": "initialized", "id": repo_id, "repository": location})
    elif not settings.quiet:
        click.echo(f"created cairn repository {repo_id[:10]} at {location}")
        click.echo(
            "Please note that knowledge of your password is required to access the "
            "repository. Losing your password means that your data is irrecoverably lost."
        )
