"""Global flags shared by every command, and moving them in front of the command."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

import click

from cairn.config.settings import Settings


def _check_compression(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> str | None:
    """Reject an unknown level at parse time, for every command alike."""
    if value is not None:
        from cairn.repo.codec import compression_level

        try:
            compression_level(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _check_duration(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> float | None:
    """``30s``, ``5m``, ``1h`` (or plain seconds) as seconds, refused at parse time."""
    if value is None:
        return None
    from cairn.config.profiles import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


GLOBAL_OPTIONS: list[click.Option] = [
    click.Option(["-r", "--repo"], help="Repository location (env CAIRN_REPOSITORY)."),
    click.Option(
        ["--repository-file"],
        metavar="FILE",
        help="Read the repository location from FILE (env CAIRN_REPOSITORY_FILE).",
    ),
    click.Option(
        ["--key-hint"],
        metavar="KEY_ID",
        help="Try the key with this ID (or ID prefix) first (env CAIRN_KEY_HINT).",
    ),
    click.Option(["--password-file"], help="Read the password from a file."),
    click.Option(["--password-command"], help="Run a command to get the password."),
    click.Option(["--json"], is_flag=True, default=None, help="Machine-readable output."),
    click.Option(
        ["--log-format"],
        type=click.Choice(["console", "json", "logfmt"]),
        help="Log line format.",
    ),
    click.Option(["--log-file"], help="Write logs to this file (info level and up)."),
    click.Option(
        ["--log-level"],
        type=click.Choice(["debug", "info", "warning", "error"]),
        help="Minimum log level (overrides -v/-q for logs).",
    ),
    click.Option(["-v", "--verbose", "verbosity"], count=True, default=None, help="More output."),
    click.Option(["-q", "--quiet"], is_flag=True, default=None, help="Only errors."),
    click.Option(["--debug"], is_flag=True, default=None, help="Tracebacks on errors."),
    click.Option(
        ["--progress/--no-progress"],
        default=None,
        help="Show progress even when stderr is not a terminal (or never).",
    ),
    click.Option(["--config"], help="Configuration file (default $XDG_CONFIG_HOME/cairn/...)."),
    click.Option(["--profile"], help="Profile of the configuration file to use."),
    click.Option(
        ["--cpu-workers"],
        type=click.IntRange(1, 256),
        help="CPU worker processes (default: one per core; for a backup behind "
        "a --limit-upload below 64 MiB/s, one).",
    ),
    click.Option(
        ["--read-concurrency"],
        type=click.IntRange(1, 256),
        help="Large files read at once; small ones go to the workers in batches "
        "(env CAIRN_READ_CONCURRENCY).",
    ),
    click.Option(["--connections"], type=click.IntRange(1, 256), help="Backend connections."),
    click.Option(["--limit-upload"], type=click.IntRange(1), help="Upload limit in KiB/s."),
    click.Option(["--limit-download"], type=click.IntRange(1), help="Download limit in KiB/s."),
    click.Option(
        ["--pack-size"],
        type=click.IntRange(4, 128),
        help="Pack size in MiB (env CAIRN_PACK_SIZE).",
    ),
    click.Option(
        ["--compression"],
        callback=_check_compression,
        help="off, fastest, auto, better, max, or a zstd level 1-22 (env CAIRN_COMPRESSION).",
    ),
    click.Option(
        ["--cache-dir"], help="Directory of the local metadata cache (env CAIRN_CACHE_DIR)."
    ),
    click.Option(["--no-cache"], is_flag=True, default=None, help="Do not use a local cache."),
    click.Option(
        ["--cleanup-cache"],
        is_flag=True,
        default=None,
        help="Remove the caches of repositories not used for 30 days.",
    ),
    click.Option(["--no-lock"], is_flag=True, default=None, help="Do not lock the repository."),
    click.Option(["--retry-lock"], type=float, help="Seconds to keep retrying a held lock."),
    click.Option(
        ["--retry-max-time"],
        metavar="DURATION",
        callback=_check_duration,
        help="Keep retrying a failing backend operation this long, e.g. 30s, 5m "
        "(default: 10 attempts; a server never reached fails at once).",
    ),
    click.Option(
        ["-o", "--option", "backend_options"],
        multiple=True,
        default=None,
        help="Backend option KEY=VALUE, e.g. s3.region=eu-west-1 (repeatable).",
    ),
    click.Option(["--insecure-kdf"], is_flag=True, default=None, hidden=True),
]


def _option_names() -> tuple[set[str], set[str]]:
    """Global option spellings split into flags and options that take a value."""
    flags: set[str] = set()
    valued: set[str] = set()
    for opt in GLOBAL_OPTIONS:
        target = flags if (opt.is_flag or opt.count) else valued
        target.update(opt.opts)
        target.update(opt.secondary_opts)
    return flags, valued


def hoist_global_options(commands: Collection[str], args: list[str]) -> list[str]:
    """Move global flags found after the command name in front of it.

    restic accepts ``restic backup -r REPO PATH``; click only knows group options
    before the subcommand. Everything after ``--`` is left alone.
    """
    flags, valued = _option_names()
    moved: list[str] = []
    kept: list[str] = []
    seen_command = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            kept.extend(args[i:])
            break
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg
        if re.fullmatch(r"-v+", arg):
            name = "-v"
        if name in flags or name in valued:
            takes_value = name in valued and "=" not in arg
            chunk = args[i : i + 2] if takes_value else [arg]
            (moved if seen_command else kept).extend(chunk)
            i += len(chunk)
            continue
        if not seen_command and not arg.startswith("-") and arg in commands:
            seen_command = True
        kept.append(arg)
        i += 1
    return moved + kept


def settings_from_params(params: dict[str, Any], *, use_config: bool = True) -> Settings:
    """Build the run's Settings from the parsed global flags, environment and profile."""
    values = {k: v for k, v in params.items() if v is not None}
    if values.get("verbosity") == 0:
        values.pop("verbosity")
    if values.get("backend_options"):
        values["backend_options"] = _backend_options(values["backend_options"])
    else:
        values.pop("backend_options", None)
    return Settings.from_flags(use_config=use_config, **values)


def _backend_options(pairs: tuple[str, ...]) -> dict[str, str]:
    """``-o key=value`` flags as a dict; the last of a repeated key wins."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="-o/--option")
        out[key.strip()] = value
    return out
