"""Running the real ``cairn`` command in a subprocess, as users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CAIRN = [sys.executable, "-m", "cairn.cli.main"]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


class Cairn:
    """A cairn command line bound to one repository and password file."""

    def __init__(
        self,
        repo: Path | str,
        password_file: Path,
        extra_env: dict[str, str] | None = None,
        global_args: tuple[str, ...] = (),
    ):
        self.repo = repo
        self.password_file = password_file
        self.global_args = global_args  # e.g. -o backend options, before every command
        # The metadata cache goes next to the password file, never into ~/.cache.
        cache_home = {"XDG_CACHE_HOME": str(Path(password_file).parent / "xdg-cache")}
        self.env = (
            {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
            | cache_home
            | (extra_env or {})
        )

    def run(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        input: bytes | None = None,
        check: bool = False,
        base: bool = True,
        timeout: float = 600,
    ) -> Result:
        cmd = list(CAIRN)
        if base:
            cmd += [
                "-r",
                str(self.repo),
                "--password-file",
                str(self.password_file),
                "--insecure-kdf",
                *self.global_args,
            ]
        cmd += list(args)
        proc = subprocess.run(
            cmd, env=self.env | (env or {}), input=input, capture_output=True, timeout=timeout
        )
        result = Result(
            proc.returncode,
            proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
        )
        self.last_stdout = proc.stdout
        if check and result.code != 0:
            raise AssertionError(f"cairn {' '.join(args)} exited {result.code}: {result.err}")
        return result

    def run_bytes(self, *args: str) -> bytes:
        """Run a command that must succeed; its raw stdout."""
        self.run(*args, check=True)
        return self.last_stdout
