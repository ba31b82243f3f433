"""Global settings: the values every command shares, from flags and environment.

Precedence is flags > environment > defaults. Profiles from TOML files slot in
between environment and defaults once they land.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Settings:
    """What the global flags and the environment say, resolved once per run."""

    repo: str | None = None
    password_file: str | None = None
    password_command: str | None = None
    json: bool = False
    log_format: str = "console"
    log_file: str | None = None
    verbosity: int = 0
    quiet: bool = False
    debug: bool = False
    cpu_workers: int | None = None
    read_concurrency: int | None = None
    connections: int | None = None
    limit_upload: int | None = None  # KiB/s
    limit_download: int | None = None  # KiB/s
    pack_size: int | None = None  # MiB
    compression: str = "auto"
    cache_dir: str | None = None
    no_cache: bool = False
    no_lock: bool = False
    retry_lock: float = 0.0
    insecure_kdf: bool = False  # cheap Argon2 parameters: tests only
    env: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_flags(cls, env: dict[str, str] | None = None, **flags: object) -> Settings:
        """Merge flags with ``CAIRN_*`` environment variables (flags win)."""
        environ = dict(os.environ if env is None else env)
        values = {k: v for k, v in flags.items() if v is not None}
        values.setdefault("repo", environ.get("CAIRN_REPOSITORY"))
        if "password_file" not in values and "password_command" not in values:
            values["password_file"] = environ.get("CAIRN_PASSWORD_FILE")
            if values["password_file"] is None:
                values["password_command"] = environ.get("CAIRN_PASSWORD_COMMAND")
        values["env"] = environ
        return cls(**values)  # type: ignore[arg-type]
