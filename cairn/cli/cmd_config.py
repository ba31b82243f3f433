"""``cairn config show``: the effective settings and where each came from."""

from __future__ import annotations

import json
from typing import Any

import click

from cairn.config.profiles import JOB_KEYS
from cairn.config.settings import Settings


@click.group("config")
def command() -> None:
    """Inspect the configuration (profiles in config.toml)."""


def _display(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple | list):
        return ", ".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _shown(name: str, value: Any) -> Any:
    """A setting as it may be printed: no password of a location URL."""
    if name == "repo" and isinstance(value, str):
        from cairn.backends.location import redact_location

        return redact_location(value)
    return value


@command.command("show")
@click.pass_obj
def show(settings: Settings) -> int:
    """Print effective settings: value and source (flag, env, profile:NAME, default).

    Select the profile with the global ``--profile NAME``. The profile's job keys
    (paths, excludes, keep-*, check, metrics, pings) are listed after the settings.
    """
    job = settings.job
    job_keys = (
        {}
        if job is None
        else {k: (v, f"profile:{job.origin[k]}") for k, v in job.values.items() if k in JOB_KEYS}
    )
    if settings.json:
        out = {
            "config_file": settings.config,
            "profile": settings.profile,
            "settings": {
                name: {"value": _jsonable(_shown(name, value)), "source": source}
                for name, value, source in settings.items()
            },
            "job": {k: {"value": v, "source": s} for k, (v, s) in job_keys.items()},
        }
        click.echo(json.dumps(out))
        return 0
    click.echo(f"config file: {settings.config or '(none)'}")
    click.echo(f"profile:     {settings.profile or '(none)'}")
    rows = [
        (name, _display(_shown(name, value)), source) for name, value, source in settings.items()
    ]
    rows += [(k, _display(v), s) for k, (v, s) in job_keys.items()]
    width = max(len(r[0]) for r in rows)
    vwidth = min(60, max(len(r[1]) for r in rows))
    for name, value, source in rows:
        click.echo(f"{name:<{width}}  {value:<{vwidth}}  {source}")
    return 0
