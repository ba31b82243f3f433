"""The backup programs under test and the commands each runs for every benchmark step.

Settings are chosen to be comparable: all encrypted, all on the same disk; compression
``auto`` means cairn's default, restic ``--compression auto`` and borg
``--compression zstd,3`` (restic's auto is zstd at its default speed, ~level 3);
``max`` means cairn ``--compression max``, restic ``--compression max`` and borg
``zstd,11`` (restic's max is klauspost/zstd's best mode, roughly level 11).
"""

from __future__ import annotations

import compileall
import importlib.util
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import Command

STEPS = (
    "init",
    "backup",
    "backup-throttled",
    "backup-nochange",
    "backup-incr",
    "restore",
    "check",
    "forget-prune",
)
BACKUP_STEPS = ("backup", "backup-nochange", "backup-incr")
# Not run unless asked for: at a link limit it takes minutes by design.
OPTIONAL_STEPS = ("backup-throttled",)
PASSWORD = "cairn-bench-password"


@dataclass
class ToolRun:
    """Where one tool works in one repetition, and what it has done so far."""

    corpus: Path
    repo: Path
    home: Path  # HOME and XDG dirs: caches start empty every repetition
    restore: Path
    password_file: Path
    compression: str  # "auto" | "max"
    limit_upload: int = 0  # KiB/s for backup-throttled (into a repository of its own)
    last_backup: str | None = None  # name of the newest successful backup step
    failed_step: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)


class Tool:
    """A backup program: how to find it, its version, and its command for each step."""

    name = ""

    def executable(self) -> list[str] | None:
        """The argv prefix that runs the program, or None when it is not installed."""
        raise NotImplementedError

    def version(self) -> str:
        """The program's version line (or why it is unknown)."""
        exe = self.executable()
        if exe is None:
            return "not installed"
        try:
            done = subprocess.run(
                [*exe, *self.version_args()],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unknown ({exc})"
        line = (done.stdout.strip() or done.stderr.strip()).splitlines()
        return line[0] if done.returncode == 0 and line else "unknown (version failed)"

    def version_args(self) -> list[str]:
        """Arguments that print the version."""
        return ["version"]

    def prepare(self) -> None:
        """Make the program ready to run as installed (untimed, once per bench run)."""

    def env(self, run: ToolRun) -> dict[str, str]:
        """Environment additions for every command of this tool."""
        return {}

    def commands(self, step: str, run: ToolRun) -> list[Command]:
        """The commands that make up ``step``."""
        raise NotImplementedError


class Cairn(Tool):
    """cairn from this checkout's virtualenv (or PATH)."""

    name = "cairn"

    def executable(self) -> list[str] | None:
        script = Path(sys.executable).parent / "cairn"
        if script.exists():
            return [str(script)]
        found = shutil.which("cairn")
        return [found] if found else [sys.executable, "-m", "cairn"]

    def prepare(self) -> None:
        """Compile cairn's bytecode, as ``pip install`` does. An editable checkout
        run with ``PYTHONDONTWRITEBYTECODE=1`` (set on this machine) otherwise
        compiles every module on every command: ~0.2-0.25 CPU-s each, a sixth of
        a no-change backup."""
        spec = importlib.util.find_spec("cairn")
        if spec is not None and spec.submodule_search_locations:
            for where in spec.submodule_search_locations:
                compileall.compile_dir(where, quiet=1)

    def commands(self, step: str, run: ToolRun) -> list[Command]:
        exe = self.executable() or ["cairn"]
        base = [*exe, "-r", str(run.repo), "--password-file", str(run.password_file)]
        if run.compression != "auto":
            base += ["--compression", run.compression]
        if step == "backup-throttled":
            base += ["--limit-upload", str(run.limit_upload)]
        args = {
            "init": ["init"],
            "restore": ["restore", "latest", "--target", str(run.restore)],
            "check": ["check", "--read-data"],
            "forget-prune": ["forget", "--keep-last", "1", "--prune"],
        }.get(step, ["backup", str(run.corpus)])
        return [Command((*base, *args))]


class Restic(Tool):
    """restic (Debian's 0.14), repository version 2 with compression."""

    name = "restic"

    def executable(self) -> list[str] | None:
        found = shutil.which("restic")
        return [found] if found else None

    def env(self, run: ToolRun) -> dict[str, str]:
        return {"RESTIC_PASSWORD": PASSWORD}

    def commands(self, step: str, run: ToolRun) -> list[Command]:
        base = [
            *(self.executable() or ["restic"]),
            "-r",
            str(run.repo),
            "--compression",
            run.compression,
        ]
        if step == "backup-throttled":
            base += ["--limit-upload", str(run.limit_upload)]  # KiB/s, as cairn's
        args = {
            "init": ["init"],
            "restore": ["restore", "latest", "--target", str(run.restore)],
            "check": ["check", "--read-data"],
            "forget-prune": ["forget", "--keep-last", "1", "--prune"],
        }.get(step, ["backup", str(run.corpus)])
        return [Command((*base, *args))]


class Borg(Tool):
    """borg 1.2 with ``repokey-blake2`` encryption (encrypted, like the others)."""

    name = "borg"

    def executable(self) -> list[str] | None:
        found = shutil.which("borg")
        return [found] if found else None

    def version_args(self) -> list[str]:
        return ["--version"]

    def env(self, run: ToolRun) -> dict[str, str]:
        return {"BORG_PASSPHRASE": PASSWORD, "BORG_BASE_DIR": str(run.home)}

    def commands(self, step: str, run: ToolRun) -> list[Command]:
        borg, repo = (self.executable() or ["borg"])[0], str(run.repo)
        level = "zstd,3" if run.compression == "auto" else "zstd,11"
        if step == "init":
            return [Command((borg, "init", "-e", "repokey-blake2", repo))]
        if step == "backup-throttled":
            return []  # borg limits uploads only to remote repositories
        if step in BACKUP_STEPS:
            return [
                Command(
                    (borg, "create", "--compression", level, f"{repo}::{step}", str(run.corpus))
                )
            ]
        if step == "restore":  # borg extracts into the working directory
            return [Command((borg, "extract", f"{repo}::{run.last_backup}"), cwd=run.restore)]
        if step == "check":
            return [Command((borg, "check", "--verify-data", repo))]
        if step == "forget-prune":
            return [
                Command((borg, "prune", "--keep-last", "1", repo)),
                Command((borg, "compact", repo)),
            ]
        raise ValueError(f"unknown step {step!r}")


TOOLS: dict[str, type[Tool]] = {"cairn": Cairn, "restic": Restic, "borg": Borg}


@dataclass(frozen=True)
class Reference:
    """A lower bound on the same corpus: not a backup tool, a plain shell pipeline."""

    name: str
    description: str
    script: str  # bash; {corpus}, {parent}, {base} and {out} are substituted

    def command(self, corpus: Path, out: Path) -> Command:
        """The command, with the corpus and output-size file filled in."""
        text = self.script.format(corpus=corpus, parent=corpus.parent, base=corpus.name, out=out)
        return Command(("bash", "-c", "set -euo pipefail; " + text))


REFERENCES = (
    Reference(
        "cat",
        "read every file: `find corpus -type f -exec cat {} + > /dev/null`",
        "find {corpus} -type f -exec cat {{}} + > /dev/null; echo 0 > {out}",
    ),
    Reference(
        "tar-zstd",
        "`tar cf - corpus | zstd -3 -T0` (output bytes counted with wc)",
        "tar cf - -C {parent} {base} | zstd -3 -T0 -q | wc -c > {out}",
    ),
)
