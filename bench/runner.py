"""Run the benchmark: every selected tool on the same corpus, step by step, alternating.

Within a repetition the steps run in order and, for each step, every tool runs once
before the next step starts (the tool order rotates between repetitions), so all
tools see the same page-cache state and the same background load. Each repetition
starts from fresh, empty repositories and caches and the pristine corpus; the
deterministic ``modify`` is applied (untimed) just before ``backup-incr``.

A tool whose step fails is recorded as failed with the first line of its error; its
later steps in that repetition are recorded as skipped. The runner never crashes on a
tool's failure.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench import corpus as corpus_mod
from bench.measure import Command, Measurement, run_all, tree_count, tree_size
from bench.results import Sample
from bench.tools import BACKUP_STEPS, PASSWORD, REFERENCES, STEPS, TOOLS, Tool, ToolRun

PREREQUISITES = {
    "backup": ("init",),
    "backup-nochange": ("backup",),
    "backup-incr": ("backup",),
    "restore": ("backup",),
    "check": ("backup",),
    "forget-prune": ("backup-incr",),  # needs two snapshots for forget to remove one
}
RATE_FROM_CORPUS = {"backup", "backup-throttled", "backup-nochange", "backup-incr", "restore"}
_SCRUBBED_ENV = ("RESTIC_", "BORG_", "CAIRN_")


@dataclass
class Config:
    """Everything a run needs to know; built by :mod:`bench.cli`."""

    tools: list[str]
    steps: list[str]  # tool steps (see STEPS) and reference names ("cat", "tar-zstd")
    corpus: str = "default"
    seed: int = corpus_mod.DEFAULT_SEED
    reps: int = 3
    compression: str = "auto"
    limit_upload: int = 5000  # KiB/s, backup-throttled only
    workdir: Path = Path("bench/work")
    profile: str | None = None  # "py-spy" | "cprofile" for cairn's steps
    profile_dir: Path = Path("bench/results/profiles")
    timeout: float = 3600.0
    keep: bool = False
    stamp: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%S"))


def needed_steps(selected: list[str]) -> list[str]:
    """The selected tool steps plus their prerequisites, in execution order."""
    need: set[str] = set()
    todo = [s for s in selected if s in STEPS]
    while todo:
        step = todo.pop()
        if step not in need:
            need.add(step)
            todo.extend(PREREQUISITES.get(step, ()))
    return [s for s in STEPS if s in need]


def tool_env(tool: Tool, run: ToolRun) -> dict[str, str]:
    """The environment for ``tool``: ours minus other tools' settings, a private HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV)}
    env.update(
        HOME=str(run.home),
        XDG_CACHE_HOME=str(run.home / ".cache"),
        XDG_CONFIG_HOME=str(run.home / ".config"),
    )
    env.update(tool.env(run))
    return env


def profiled(cmd: Command, mode: str, out: Path) -> Command:
    """``cmd`` wrapped to run under py-spy (flame graph SVG) or cProfile (.prof)."""
    if mode == "py-spy":
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        wrapper = (
            spy,
            "record",
            "--subprocesses",
            "--rate",
            "200",
            "-o",
            str(out.with_suffix(".svg")),
            "--",
        )
        return Command((*wrapper, *cmd.argv), cmd.cwd)
    script = cmd.argv[0]
    if script == sys.executable:  # "python -m cairn ...": profile the module
        return Command(
            (sys.executable, "-m", "cProfile", "-o", str(out.with_suffix(".prof")), *cmd.argv[2:]),
            cmd.cwd,
        )
    return Command(
        (sys.executable, "-m", "cProfile", "-o", str(out.with_suffix(".prof")), *cmd.argv), cmd.cwd
    )


class Runner:
    """Executes a :class:`Config` and collects :class:`Sample` objects."""

    def __init__(self, config: Config, say: Callable[[str], None] = print) -> None:
        self.config = config
        self.say = say
        self.work = config.workdir.resolve()
        self.corpus_dir = self.work / f"corpus-{config.corpus}-{config.seed}"
        self.logs = self.work / "logs" / config.stamp
        self.samples: list[Sample] = []
        self.tools: list[Tool] = [TOOLS[name]() for name in config.tools]

    def prepare(self) -> corpus_mod.Layout:
        """Create or reuse the pristine corpus and warm the page cache with it."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.say(f"corpus {self.config.corpus!r} in {self.corpus_dir}")
        layout = corpus_mod.ensure_pristine(self.corpus_dir, self.config.corpus, self.config.seed)
        # Warm cache: read every file once (untimed), as the "cat" reference does.
        run_all(
            [REFERENCES[0].command(self.corpus_dir, self.work / "warm.out")],
            os.environ,
            self.logs / "warm-up.log",
            self.config.timeout,
        )
        for tool in self.tools:
            tool.prepare()
        return layout

    def run(self) -> list[Sample]:
        """All repetitions; returns the samples (also kept in ``self.samples``)."""
        for rep in range(1, self.config.reps + 1):
            self.say(f"repetition {rep}/{self.config.reps}")
            corpus_mod.revert(self.corpus_dir)
            shift = (rep - 1) % max(1, len(self.tools))
            order = self.tools[shift:] + self.tools[:shift]
            self._references(rep)
            runs = {tool.name: self._fresh_run(tool, rep) for tool in order}
            for step in needed_steps(self.config.steps):
                if step == "backup-incr":
                    corpus_mod.modify(self.corpus_dir, generation=1)
                for tool in order:
                    self._step(tool, runs[tool.name], step, rep)
            if not self.config.keep or rep < self.config.reps:
                for tool in order:
                    shutil.rmtree(self.work / "reps" / tool.name, ignore_errors=True)
        corpus_mod.revert(self.corpus_dir)
        shutil.rmtree(self.work / "restores", ignore_errors=True)
        return self.samples

    def _fresh_run(self, tool: Tool, rep: int) -> ToolRun:
        base = self.work / "reps" / tool.name
        shutil.rmtree(base, ignore_errors=True)
        (base / "home").mkdir(parents=True)
        password_file = base / "password"
        password_file.write_text(PASSWORD + "\n")
        return ToolRun(
            corpus=self.corpus_dir,
            repo=base / "repo",
            home=base / "home",
            # Kept until the run ends (see _step): its own directory per repetition.
            restore=self.work / "restores" / f"{tool.name}-r{rep}",
            password_file=password_file,
            compression=self.config.compression,
            limit_upload=self.config.limit_upload,
        )

    def _references(self, rep: int) -> None:
        corpus_bytes = tree_count(self.corpus_dir)[1]
        for ref in REFERENCES:
            if ref.name not in self.config.steps:
                continue
            out = self.work / f"{ref.name}.out"
            load = os.getloadavg()[0]
            m = run_all(
                [ref.command(self.corpus_dir, out)],
                os.environ,
                self.logs / f"reference-{ref.name}-r{rep}.log",
                self.config.timeout,
            )
            size = int(out.read_text() or 0) if m.ok and out.exists() else None
            self._record("reference", ref.name, rep, m, size or None, corpus_bytes, load)

    def _step(self, tool: Tool, run: ToolRun, step: str, rep: int) -> None:
        selected = step in self.config.steps
        if run.failed_step is not None:
            if selected:
                skipped = Measurement(0.0, 0.0, 0, -1, f"skipped: {run.failed_step} failed")
                self._record(tool.name, step, rep, skipped, None, None, 0.0)
            return
        if step == "restore":
            shutil.rmtree(run.restore, ignore_errors=True)
            run.restore.mkdir(parents=True)
        if step == "backup-throttled":
            # A first backup at a link limit, into a repository of its own (initialised
            # untimed), so it uploads everything whatever ran before.
            run = replace(run, repo=run.repo.with_name("repo-throttled"))
            if not tool.commands(step, run):
                return  # the tool cannot limit this kind of repository
            init = run_all(tool.commands("init", run), tool_env(tool, run), self.logs /
                           f"{tool.name}-{step}-init-r{rep}.log", self.config.timeout)  # fmt: skip
            if not init.ok:
                self._record(tool.name, step, rep, init, None, None, 0.0)
                return
        cmds = tool.commands(step, run)
        if self.config.profile and tool.name == "cairn":
            out = self.config.profile_dir.resolve() / f"{self.config.stamp}-{step}-r{rep}"
            out.parent.mkdir(parents=True, exist_ok=True)
            cmds = [profiled(c, self.config.profile, out) for c in cmds]
        # Write back what earlier steps (or another tool) left dirty, and the deletion of
        # the previous restore target, so no step pays for its predecessor's I/O.
        os.sync()
        load = os.getloadavg()[0]
        m = run_all(
            cmds,
            tool_env(tool, run),
            self.logs / f"{tool.name}-{step}-r{rep}.log",
            self.config.timeout,
        )
        if m.ok and step == "restore":
            m = self._verify_restore(run, m)
        if m.ok and step in BACKUP_STEPS:
            run.last_backup = step
        if not m.ok and step != "backup-throttled":
            run.failed_step = step
        files, data = tree_count(self.corpus_dir) if step in RATE_FROM_CORPUS else (None, None)
        repo = tree_size(run.repo) if run.repo.exists() else None
        if step == "check":
            data = repo
        self.say(
            f"  {tool.name:7} {step:16} " + (f"{m.wall_s:8.2f} s" if m.ok else f"FAILED: {m.error}")
        )
        # The restore target stays until the run ends: on ext4 without a journal,
        # creating an inode skips every inode of its block group freed in the last
        # minute, and a restore made right after 20,000 files were deleted spent
        # 4-20x more kernel time than one made without (docs/architecture.md,
        # Restore, "CPU shape"): it would measure the deletion, not the tool.
        if selected:
            self._record(tool.name, step, rep, m, repo, data, load, files)

    def _verify_restore(self, run: ToolRun, m: Measurement) -> Measurement:
        """A restore counts only if it brought back as many files and bytes as the corpus."""
        want, got = tree_count(self.corpus_dir), tree_count(run.restore)
        if want == got:
            return m
        error = f"restore incomplete: {got[0]} files/{got[1]} bytes, expected {want[0]}/{want[1]}"
        return Measurement(m.wall_s, m.cpu_s, m.peak_bytes, m.exit_code, error)

    def _record(
        self,
        tool: str,
        step: str,
        rep: int,
        m: Measurement,
        repo: int | None,
        data: int | None,
        load: float,
        files: int | None = None,
    ) -> None:
        self.samples.append(
            Sample(
                tool,
                step,
                rep,
                m.ok,
                m.wall_s,
                m.cpu_s,
                m.peak_bytes,
                repo,
                data,
                m.error,
                load,
                files,
            )
        )
