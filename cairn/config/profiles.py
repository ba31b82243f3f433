"""Named profiles from a TOML file, with inheritance and key checking.

The file (``--config``, ``$CAIRN_CONFIG``, or ``$XDG_CONFIG_HOME/cairn/config.toml``)
holds ``default_profile`` and one ``[profiles.NAME]`` table per profile; a profile
may ``inherit = "other"``. ``docs/config.md`` lists every key. Any problem is a
:class:`ConfigError` whose one-line message names the file, the line and the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(Exception):
    """The configuration file is unreadable, malformed or names an unknown key."""

    exit_code = 1


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return _int(v) or isinstance(v, float)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _strs(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _str_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, str) for x in v.values())


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | float) -> float:
    """Seconds in a duration such as ``30s``, ``5m``, ``1h30m``, ``500ms`` or ``90``.

    A bare number is seconds. Raises ``ValueError`` with a one-line message.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        return float(value)
    text = str(value).strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m[1]) * _UNIT_SECONDS[m[2]]
            pos = m.end()
        if not text or pos != len(text):
            raise ValueError(
                f"invalid duration {value!r}: use e.g. 30s, 5m, 1h30m (units ms, s, m, h)"
            ) from None
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"invalid duration {value!r}: must be a finite positive time")
    return seconds


def _duration(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        return False
    try:
        parse_duration(v)
    except ValueError:
        return False
    return True


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (_str, "a string"),
    "int": (_int, "an integer"),
    "num": (_num, "a number"),
    "bool": (_bool, "true or false"),
    "strs": (_strs, "a list of strings"),
    "map": (_str_map, "a table of strings"),
    "duration": (_duration, 'a duration such as "30s" or "5m" (or seconds)'),
}

#: Profile keys that become :class:`~cairn.config.settings.Settings` fields
#: (key -> (kind, settings field)).
SETTINGS_KEYS: dict[str, tuple[str, str]] = {
    "repository": ("str", "repo"),
    "repository_file": ("str", "repository_file"),
    "key_hint": ("str", "key_hint"),
    "password_file": ("str", "password_file"),
    "password_command": ("str", "password_command"),
    "backend_options": ("map", "backend_options"),
    "log_format": ("str", "log_format"),
    "log_file": ("str", "log_file"),
    "log_level": ("str", "log_level"),
    "cpu_workers": ("int", "cpu_workers"),
    "read_concurrency": ("int", "read_concurrency"),
    "connections": ("int", "connections"),
    "limit_upload": ("int", "limit_upload"),
    "limit_download": ("int", "limit_download"),
    "limit_upload_schedule": ("strs", "limit_upload_schedule"),
    "limit_download_schedule": ("strs", "limit_download_schedule"),
    "pack_size": ("int", "pack_size"),
    "compression": ("str", "compression"),
    "cache_dir": ("str", "cache_dir"),
    "no_cache": ("bool", "no_cache"),
    "cleanup_cache": ("bool", "cleanup_cache"),
    "retry_lock": ("num", "retry_lock"),
    "retry_max_time": ("duration", "retry_max_time"),
}

#: Profile keys that only ``cairn run`` reads (the job: what, how long to keep, checks).
JOB_KEYS: dict[str, str] = {
    "paths": "strs",
    "excludes": "strs",
    "iexcludes": "strs",
    "exclude_files": "strs",
    "exclude_if_present": "strs",
    "exclude_larger_than": "str",
    "one_file_system": "bool",
    "exclude_caches": "bool",
    "skip_if_unchanged": "bool",
    "tags": "strs",
    "host": "str",
    "keep_last": "int",
    "keep_hourly": "int",
    "keep_daily": "int",
    "keep_weekly": "int",
    "keep_monthly": "int",
    "keep_yearly": "int",
    "keep_within": "str",
    "keep_tags": "strs",
    "group_by": "str",
    "forget": "bool",
    "prune": "bool",
    "max_unused": "str",
    "check": "bool",
    "check_subset": "str",
    "metrics_file": "str",
    "ping_url_success": "str",
    "ping_url_failure": "str",
    "ping_method": "str",
    "ping_timeout": "num",
    "recovery_recipients": "strs",
    "recovery_recipients_file": "str",
}

_CHOICES = {
    "log_format": ("console", "json", "logfmt"),
    "log_level": ("debug", "info", "warning", "error"),
    "ping_method": ("GET", "POST"),
}
_TOP_LEVEL = {"default_profile", "profiles"}

#: Inclusive bounds of numeric keys (the same as the flags'; None: unbounded).
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "cpu_workers": (1, 256),
    "read_concurrency": (1, 256),
    "connections": (1, 256),
    "limit_upload": (0, None),  # 0: unlimited
    "limit_download": (0, None),
    "pack_size": (4, 128),
    "retry_lock": (0, None),
    "ping_timeout": (0.001, None),
    **{f"keep_{u}": (-1, None) for u in ("last", "hourly", "daily", "weekly", "monthly", "yearly")},
}


def _check_url(text: str) -> None:
    import urllib.parse

    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError("must be an http:// or https:// URL with a host name")
    url.port  # noqa: B018 - raises ValueError on a port that is not a number


def _check_recipients(values: list[str]) -> None:
    from cairn.repo.age import parse_recipient

    for value in values:
        parse_recipient(value)  # BadRecipient is a ValueError naming the recipient


def _value_checks() -> dict[str, Callable[[Any], object]]:
    """Parsers of string values, the ones the commands use (imported on demand): each
    raises ``ValueError`` with a message for the user."""
    from cairn.repo.codec import compression_level
    from cairn.stages.check import parse_subset
    from cairn.stages.forget import Duration, parse_group_by
    from cairn.stages.prune import max_unused_limit
    from cairn.stages.units import parse_size

    return {
        "compression": compression_level,
        "exclude_larger_than": parse_size,
        "keep_within": Duration.parse,
        "group_by": parse_group_by,
        "max_unused": max_unused_limit,
        "check_subset": parse_subset,
        "ping_url_success": _check_url,
        "ping_url_failure": _check_url,
        "recovery_recipients": _check_recipients,
    }


def profile_keys() -> dict[str, str]:
    """Every profile key and its kind (``str``, ``int``, ``strs`` …), ``inherit`` included."""
    keys = {"inherit": "str"} | {k: kind for k, (kind, _) in SETTINGS_KEYS.items()}
    return keys | JOB_KEYS


@dataclass(frozen=True)
class Profile:
    """One resolved profile: its values after inheritance and where each came from."""

    name: str
    path: str
    values: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # key -> defining profile

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


def default_config_path(env: Mapping[str, str]) -> str:
    """``$XDG_CONFIG_HOME/cairn/config.toml`` (``~/.config`` when unset)."""
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "cairn", "config.toml")


class ConfigFile:
    """A parsed and validated configuration file."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self._lines = text.splitlines()
        try:
            self.data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise self._decode_error(exc) from None
        self._validate()

    @classmethod
    def load(cls, path: str) -> ConfigFile:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path}: not valid UTF-8") from None
        return cls(path, text)

    # -- errors that point at a line ---------------------------------------------

    def _decode_error(self, exc: tomllib.TOMLDecodeError) -> ConfigError:
        msg = str(exc)
        m = re.search(r"\s*\(at line (\d+), column \d+\)$", msg)
        if m:
            return ConfigError(f"config file {self.path}, line {m[1]}: {msg[: m.start()]}")
        return ConfigError(f"config file {self.path}: {msg}")

    def _line_of(self, key: str, table: str | None) -> int | None:
        """Line number (1-based) of ``key = …`` inside ``[table]`` (best effort)."""
        current: str | None = None
        header = re.compile(r"^\s*\[+\s*([^\]]+?)\s*\]+")
        assign = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        for number, line in enumerate(self._lines, 1):
            m = header.match(line)
            if m:
                current = m[1].replace('"', "").replace("'", "").replace(" ", "")
                if table is None and current == key:
                    return number
                continue
            if current == table and assign.match(line):
                return number
        return None

    def error(self, message: str, key: str, table: str | None) -> ConfigError:
        line = self._line_of(key, table)
        where = f", line {line}" if line else ""
        return ConfigError(f"config file {self.path}{where}: {message}")

    # -- validation ----------------------------------------------------------------

    def _validate(self) -> None:
        for key, value in self.data.items():
            if key not in _TOP_LEVEL:
                hint = " (profiles go in [profiles.NAME] tables)" if isinstance(value, dict) else ""
                raise self.error(f"unknown key {key!r}{hint}", key, None)
        default = self.data.get("default_profile")
        if default is not None and not isinstance(default, str):
            raise self.error("key 'default_profile' must be a string", "default_profile", None)
        profiles = self.data.get("profiles", {})
        if not isinstance(profiles, dict):
            raise self.error("key 'profiles' must be a table of profiles", "profiles", None)
        known = profile_keys()
        for name, body in profiles.items():
            table = f"profiles.{name}"
            if not isinstance(body, dict):
                raise self.error(f"profile {name!r} must be a table", name, "profiles")
            for key, value in body.items():
                kind = known.get(key)
                if kind is None:
                    raise self.error(f"profile {name!r}: unknown key {key!r}", key, table)
                check, expected = _KINDS[kind]
                if not check(value):
                    raise self.error(
                        f"profile {name!r}: key {key!r} must be {expected}, got {value!r}",
                        key,
                        table,
                    )
                choices = _CHOICES.get(key)
                if choices and value not in choices:
                    raise self.error(
                        f"profile {name!r}: key {key!r} must be one of {', '.join(choices)}, "
                        f"got {value!r}",
                        key,
                        table,
                    )
            for key in ("limit_upload_schedule", "limit_download_schedule"):
                if key in body:
                    self._check_schedule(name, key, body[key])
            self._check_values(name, body)

    def _check_values(self, name: str, body: dict[str, Any]) -> None:
        """Ranges and formats, so that a bad value fails before anything runs (not as
        an internal error, nor after the backup of a ``cairn run``)."""
        table = f"profiles.{name}"
        for key, (low, high) in _RANGES.items():
            value = body.get(key)
            if value is None:
                continue
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f"at least {low}" if high is None else f"between {low} and {high}"
                raise self.error(
                    f"profile {name!r}: key {key!r} must be {bounds}, got {value!r}", key, table
                )
        checks = _value_checks()
        for key, check in checks.items():
            if key not in body:
                continue
            try:
                check(body[key])
            except ValueError as exc:
                raise self.error(f"profile {name!r}: key {key!r}: {exc}", key, table) from None

    def _check_schedule(self, name: str, key: str, entries: list[str]) -> None:
        from cairn.config.schedule import parse_schedule

        try:
            parse_schedule(entries)
        except ValueError as exc:
            message = f"profile {name!r}: key {key!r}: {exc}"
            raise self.error(message, key, f"profiles.{name}") from None

    # -- profiles ------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.data.get("profiles", {}))

    @property
    def default_profile(self) -> str | None:
        name = self.data.get("default_profile")
        if name is None and "default" in self.names:
            return "default"
        return name

    def profile(self, name: str) -> Profile:
        """The profile called ``name`` with its ``inherit`` chain applied."""
        profiles: dict[str, dict[str, Any]] = self.data.get("profiles", {})
        if name not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            raise ConfigError(f"config file {self.path}: no profile {name!r} (profiles: {known})")
        chain: list[str] = []
        current: str | None = name
        while current is not None:
            if current in chain:
                cycle = " -> ".join([*chain, current])
                raise self.error(f"inheritance cycle: {cycle}", "inherit", f"profiles.{current}")
            if current not in profiles:
                child = chain[-1]
                raise self.error(
                    f"profile {child!r} inherits unknown profile {current!r}",
                    "inherit",
                    f"profiles.{child}",
                )
            chain.append(current)
            current = profiles[current].get("inherit")
        values: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for member in reversed(chain):  # base first, the named profile last
            for key, value in profiles[member].items():
                if key == "inherit":
                    continue
                if key == "backend_options":  # tables merge; everything else replaces
                    value = {**values.get(key, {}), **value}
                values[key] = value
                origin[key] = member
        return Profile(name=name, path=self.path, values=values, origin=origin)


def load_profile(
    env: Mapping[str, str], config: str | None, name: str | None
) -> tuple[Profile | None, str | None]:
    """The selected profile and the config file path it came from (if any file was read).

    An explicit ``config`` must exist; the default path is optional. A named profile
    without any config file is an error.
    """
    path = config or env.get("CAIRN_CONFIG")
    explicit = path is not None
    path = path or default_config_path(env)
    if not os.path.exists(path):
        if explicit:
            raise ConfigError(f"config file {path} does not exist")
        if name:
            raise ConfigError(f"profile {name!r} given but there is no config file at {path}")
        return None, None
    cfg = ConfigFile.load(path)
    chosen = name or cfg.default_profile
    if chosen is None:
        return None, path
    return cfg.profile(chosen), path
