"""Global settings: the values every command shares, from flags, environment and profile.

Precedence is flags > environment > profile > defaults. ``Settings.sources`` says
where each value came from (``flag``, ``env``, ``profile:NAME`` or ``default``), for
``cairn config show``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from cairn.config.profiles import (
    SETTINGS_KEYS,
    ConfigError,
    Profile,
    load_profile,
    parse_duration,
)

#: Environment variables and the settings they fill.
ENV_VARS = {
    "repo": "CAIRN_REPOSITORY",
    "password_file": "CAIRN_PASSWORD_FILE",
    "password_command": "CAIRN_PASSWORD_COMMAND",
    "profile": "CAIRN_PROFILE",
    "config": "CAIRN_CONFIG",
    "repository_file": "CAIRN_REPOSITORY_FILE",
}
#: Environment variables of settings that are a plain value (restic's ``RESTIC_*``
#: names with cairn's prefix), and how each is checked: ``(variable, int bounds)``
#: for numbers, ``(variable, None)`` for strings. Flags beat them; they beat the profile.
ENV_VALUES: dict[str, tuple[str, tuple[int, int] | None]] = {
    "key_hint": ("CAIRN_KEY_HINT", None),
    "cache_dir": ("CAIRN_CACHE_DIR", None),
    "compression": ("CAIRN_COMPRESSION", None),
    "pack_size": ("CAIRN_PACK_SIZE", (4, 128)),
    "read_concurrency": ("CAIRN_READ_CONCURRENCY", (1, 256)),
}
_LOCATION = ("repo", "repository_file")
_PASSWORD = ("password_file", "password_command")
# Fields that are bookkeeping, not settings a user sets.
_INTERNAL = {"env", "sources", "flags", "job"}


@dataclass(frozen=True)
class Settings:
    """What the global flags, the environment and the profile say, resolved once per run."""

    repo: str | None = None
    repository_file: str | None = None  # read when the repository is opened
    key_hint: str | None = None  # the key file tried first
    password_file: str | None = None
    password_command: str | None = None
    json: bool = False
    log_format: str = "console"
    log_file: str | None = None
    log_level: str | None = None  # None: from -v/-q (and info for a log file)
    verbosity: int = 0
    quiet: bool = False
    debug: bool = False
    progress: bool | None = None  # None: only when stderr is a terminal
    cpu_workers: int | None = None
    read_concurrency: int | None = None
    connections: int | None = None
    limit_upload: int | None = None  # KiB/s
    limit_download: int | None = None  # KiB/s
    limit_upload_schedule: tuple[str, ...] = ()
    limit_download_schedule: tuple[str, ...] = ()
    pack_size: int | None = None  # MiB
    compression: str = "auto"
    cache_dir: str | None = None
    no_cache: bool = False
    cleanup_cache: bool = False  # remove caches unused for 30 days when opening
    no_lock: bool = False
    retry_lock: float = 0.0
    retry_max_time: float | None = None  # seconds; None: 10 attempts, no first-contact retry
    backend_options: dict[str, str] = field(default_factory=dict)
    insecure_kdf: bool = False  # cheap Argon2 parameters: tests only
    profile: str | None = None
    config: str | None = None  # the config file that was read, if any
    job: Profile | None = field(default=None, repr=False)  # the profile's job keys, for run
    sources: dict[str, str] = field(default_factory=dict, repr=False)
    flags: dict[str, Any] = field(default_factory=dict, repr=False)
    env: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_flags(
        cls, env: dict[str, str] | None = None, *, use_config: bool = True, **flags: object
    ) -> Settings:
        """Merge flags, ``CAIRN_*`` environment variables and the selected profile.

        ``use_config=False`` ignores the configuration file (to log a broken one).
        """
        environ = dict(os.environ if env is None else env)
        given = {k: v for k, v in flags.items() if v is not None}
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}

        def put(name: str, value: Any, source: str) -> None:
            values[name] = value
            sources[name] = source

        profile_name = given.get("profile") or environ.get(ENV_VARS["profile"])
        profile, path = (
            load_profile(environ, given.get("config"), profile_name)  # type: ignore[arg-type]
            if use_config
            else (None, None)
        )
        if profile is not None:
            for key, (_, name) in SETTINGS_KEYS.items():
                if key in profile.values:
                    value = profile.values[key]
                    put(
                        name,
                        tuple(value) if isinstance(value, list) else value,
                        f"profile:{profile.origin[key]}",
                    )
            put(
                "profile",
                profile.name,
                "flag"
                if "profile" in given
                else "env"
                if environ.get(ENV_VARS["profile"])
                else f"profile:{profile.name}",
            )
        if path is not None:
            put(
                "config",
                path,
                "flag"
                if "config" in given
                else "env"
                if environ.get(ENV_VARS["config"])
                else "default",
            )
        # The password is one choice made as a whole: a source named on a higher
        # layer replaces every source named below it.
        if any(k in given for k in _PASSWORD):
            for k in _PASSWORD:
                values.pop(k, None)
                sources.pop(k, None)
        elif any(environ.get(ENV_VARS[k]) for k in _PASSWORD) or "CAIRN_PASSWORD" in environ:
            for k in _PASSWORD:
                values.pop(k, None)
                sources.pop(k, None)
            for k in _PASSWORD:
                if environ.get(ENV_VARS[k]):
                    put(k, environ[ENV_VARS[k]], "env")
                    break
        _choose_location(values, sources, environ, given)
        for name, value in _env_values(environ).items():
            put(name, value, "env")
        for name, value in given.items():
            if name in ("profile", "config", *_LOCATION):
                continue
            if name == "backend_options":  # -o keys add to / override the profile's table
                value = {**values.get(name, {}), **value}  # type: ignore[dict-item]
            put(name, value, "flag")
        if isinstance(values.get("retry_max_time"), str):  # a profile's "5m"
            values["retry_max_time"] = parse_duration(values["retry_max_time"])
        for f in fields(cls):
            if f.name not in _INTERNAL:
                sources.setdefault(f.name, "default")
        return cls(**values, job=profile, sources=sources, flags=dict(given), env=environ)

    def repository(self) -> str | None:
        """The repository location: ``repo``, or read from ``repository_file``
        (restic's ``--repository-file``: the file's text, stripped)."""
        if not self.repository_file:
            return self.repo
        path = self.repository_file
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read().strip()
        except FileNotFoundError:
            raise RepositoryFileError(f"repository file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not valid UTF-8"
            raise RepositoryFileError(f"cannot read repository file {path}: {why}") from None
        if not text:
            raise RepositoryFileError(f"repository file {path} is empty")
        return text

    def with_profile(self, name: str) -> Settings:
        """The same flags and environment resolved against another profile."""
        return Settings.from_flags(self.env, **{**self.flags, "profile": name})

    def items(self) -> list[tuple[str, Any, str]]:
        """``(name, value, source)`` for every user-facing setting."""
        out = []
        for f in fields(self):
            if f.name in _INTERNAL:
                continue
            out.append((f.name, getattr(self, f.name), self.sources.get(f.name, "default")))
        return out


class RepositoryFileError(Exception):
    """``--repository-file`` names a file that cannot be read or holds nothing."""

    exit_code = 1


def _choose_location(
    values: dict[str, Any], sources: dict[str, str], environ: dict[str, str], given: dict[str, Any]
) -> None:
    """The repository location is one choice, like the password: ``-r``/``--repository-file``
    beat ``CAIRN_REPOSITORY``/``CAIRN_REPOSITORY_FILE``, which beat the profile's
    ``repository``/``repository_file``. Naming both on one layer is an error (as
    restic's "-r and --repository-file are mutually exclusive")."""
    layers = [
        ("flag", {k: given[k] for k in _LOCATION if given.get(k)}),
        ("env", {k: environ[ENV_VARS[k]] for k in _LOCATION if environ.get(ENV_VARS[k])}),
        ("profile", {k: values[k] for k in _LOCATION if values.get(k)}),
    ]
    names = {
        "flag": ("-r/--repo", "--repository-file"),
        "env": ("CAIRN_REPOSITORY", "CAIRN_REPOSITORY_FILE"),
        "profile": ("the profile's repository", "repository_file"),
    }
    for layer, chosen in layers:
        if not chosen:
            continue
        if len(chosen) == 2:
            first, second = names[layer]
            raise ConfigError(f"{first} and {second} are mutually exclusive: give only one")
        if layer == "profile":
            return  # already in values, with the profile's source
        for k in _LOCATION:
            values.pop(k, None)
            sources.pop(k, None)
        for k, v in chosen.items():
            values[k] = v
            sources[k] = layer
        return


def _env_values(environ: dict[str, str]) -> dict[str, Any]:
    """The ``ENV_VALUES`` set in ``environ`` (empty means unset, as in restic), checked
    as their flags are: a bad value is a one-line error naming the variable."""
    out: dict[str, Any] = {}
    for name, (var, bounds) in ENV_VALUES.items():
        text = environ.get(var, "").strip()
        if not text:
            continue
        if bounds is None:
            if name == "compression":
                from cairn.repo.codec import compression_level

                try:
                    compression_level(text)
                except ValueError as exc:
                    raise ConfigError(f"invalid value for {var} {text!r}: {exc}") from None
            out[name] = text
            continue
        low, high = bounds
        try:
            number = int(text)
        except ValueError:
            raise ConfigError(f"invalid value for {var} {text!r}: not an integer") from None
        if not low <= number <= high:
            raise ConfigError(f"invalid value for {var} {text!r}: must be in {low}..{high}")
        out[name] = number
    return out
