"""``cairn version``."""

from __future__ import annotations

import json
import platform
import sys

import click

from cairn import __version__
from cairn.config.settings import Settings


@click.command("version")
@click.pass_obj
def command(settings: Settings) -> None:
    """Print the version of cairn and of Python."""
    info = {
        "version": __version__,
        "python": platform.python_version(),
        "platform": f"{sys.platform}/{platform.machine()}",
    }
    if settings.json:
        click.echo(json.dumps(info))
    else:
        click.echo(
            f"cairn {info['version']} compiled with Python {info['python']} on {info['platform']}"
        )
