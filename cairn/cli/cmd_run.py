"""``cairn run PROFILE``: the configured job — backup, forget/prune, check — as one run.

Each step invokes the same click command a user would (``backup``, ``forget
--prune``, ``check``) in-process, with arguments built from the profile, so the
job behaves exactly like the commands typed by hand. The run ends with one
summary, an exit code (the first failing step's code; 3 when the backup was
partial and nothing else failed), an optional Prometheus textfile and a ping.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import click
import structlog

from cairn.cli import logsetup
from cairn.cli.errors import (
    EXIT_FATAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    describe,
    print_error,
)
from cairn.config.profiles import ConfigError, Profile
from cairn.config.settings import Settings

log = structlog.get_logger("cairn.run")

_KEEP = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass
class Step:
    """One step of the run and how it ended."""

    name: str
    args: list[str]
    exit_code: int | None = None  # None: skipped
    command: str | None = None  # the cairn command it runs; None: the step's name
    error: str | None = None
    note: str | None = None
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "status": self.status,
            "exit_code": self.exit_code,
            "error": self.error,
            "note": self.note,
            "seconds": round(self.seconds, 3),
        }

    @property
    def status(self) -> str:
        if self.exit_code is None:
            return "skipped"
        return {EXIT_OK: "ok", EXIT_PARTIAL: "partial"}.get(self.exit_code, "failed")


def _backup_args(job: Profile) -> list[str]:
    paths = job.get("paths") or []
    if not paths:
        raise ConfigError(f"config file {job.path}: profile {job.name!r} has no 'paths' to back up")
    args: list[str] = []
    for key, flag in (
        ("excludes", "--exclude"),
        ("iexcludes", "--iexclude"),
        ("exclude_files", "--exclude-file"),
        ("exclude_if_present", "--exclude-if-present"),
        ("tags", "--tag"),
    ):
        for value in job.get(key) or []:
            args += [flag, value]
    if job.get("exclude_larger_than"):
        args += ["--exclude-larger-than", job.get("exclude_larger_than")]
    for key, flag in (
        ("one_file_system", "--one-file-system"),
        ("exclude_caches", "--exclude-caches"),
        ("skip_if_unchanged", "--skip-if-unchanged"),
    ):
        if job.get(key):
            args.append(flag)
    if job.get("host"):
        args += ["--host", job.get("host")]
    return [*args, "--", *paths]


def _forget_args(job: Profile) -> list[str] | None:
    """``forget`` arguments, or None when the profile has no keep policy."""
    args: list[str] = []
    for unit in _KEEP:
        value = job.get(f"keep_{unit}")
        if value:
            args += [f"--keep-{unit}", str(value)]
    if job.get("keep_within"):
        args += ["--keep-within", job.get("keep_within")]
    for tag in job.get("keep_tags") or []:
        args += ["--keep-tag", tag]
    if not args:
        return None
    if job.get("group_by"):
        args += ["--group-by", job.get("group_by")]
    # Only this host's snapshots: one host's policy must not thin out another's.
    from cairn.cli.common import hostname

    args += ["--host", job.get("host") or hostname()]
    if job.get("prune", True):
        args.append("--prune")
        if job.get("max_unused"):
            args += ["--max-unused", job.get("max_unused")]
    return args


def _check_args(job: Profile) -> list[str]:
    subset = job.get("check_subset")
    return ["--read-data-subset", subset] if subset else []


def _recovery_args(job: Profile) -> list[str] | None:
    """``key add --if-missing`` arguments escrowing the key to the profile's recovery
    recipients, or None when it names none."""
    args: list[str] = []
    for recipient in job.get("recovery_recipients") or []:
        args += ["--recipient", recipient]
    if job.get("recovery_recipients_file"):
        args += ["--recipients-file", job.get("recovery_recipients_file")]
    return ["add", "--if-missing", *args] if args else None


def plan(job: Profile) -> list[Step]:
    """The steps a profile asks for, in order (skipped ones carry a note).

    A profile with recovery recipients first makes sure the repository has a recovery
    key for exactly them (a fleet's hosts pick up a new escrow on their next run); its
    failure does not stop the backup, but it fails the run.
    """
    recovery = _recovery_args(job)
    steps = [Step("recovery-key", recovery, command="key")] if recovery else []
    steps.append(Step("backup", _backup_args(job)))
    forget = _forget_args(job)
    if not job.get("forget", True):
        steps.append(Step("forget", [], note="disabled in the profile (forget = false)"))
    elif forget is None:
        steps.append(Step("forget", [], note="no keep_* policy in the profile"))
    else:
        steps.append(Step("forget", forget))
    if job.get("check", True):
        steps.append(Step("check", _check_args(job)))
    else:
        steps.append(Step("check", [], note="disabled in the profile (check = false)"))
    return steps


def _load_command(name: str) -> click.Command | None:
    try:
        module = importlib.import_module(f"cairn.cli.cmd_{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"cairn.cli.cmd_{name}":
            return None
        raise
    command: click.Command = module.command
    return command


def run_step(settings: Settings, step: Step) -> None:
    """Invoke the step's command in-process; record its exit code, error and meta."""
    command = _load_command(step.command or step.name)
    if command is None:
        step.note = f"'cairn {step.name}' is not available in this build"
        log.warning("run.step_skipped", step=step.name, reason=step.note)
        return
    logsetup.RUN_CONTEXT["step"] = step.name
    started = time.monotonic()
    try:
        ctx = command.make_context(step.command or step.name, list(step.args), obj=settings)
        with ctx:
            result = command.invoke(ctx)
        step.meta = dict(ctx.meta)
        step.exit_code = result if isinstance(result, int) else EXIT_OK
    except click.ClickException as exc:
        step.exit_code = EXIT_FATAL
        step.error = exc.format_message()
    except click.exceptions.Exit as exc:
        step.exit_code = int(exc.exit_code)
    except Exception as exc:
        step.exit_code, step.error = describe(exc)
    except BaseException as exc:  # Ctrl-C between steps, or an exception group with one
        step.exit_code, step.error = describe(exc)
        if step.exit_code != EXIT_INTERRUPTED:
            raise
    finally:
        step.seconds = time.monotonic() - started
        logsetup.RUN_CONTEXT.pop("step", None)
    if step.error:
        print_error(f"{step.name}: {step.error}", as_json=settings.json, during=step.name)
        logsetup.note_error(f"{step.name}: {step.error}")
    event = log.info if step.exit_code == EXIT_OK else log.warning
    if step.exit_code not in (EXIT_OK, EXIT_PARTIAL):
        event = log.error
    event(
        "run.step_finished",
        step=step.name,
        exit_code=step.exit_code,
        error=step.error,
        duration=round(step.seconds, 3),
    )


def exit_code_of(steps: list[Step]) -> int:
    """The first failing step's code; 3 if only the backup was partial; else 0."""
    codes = [s.exit_code for s in steps if s.exit_code is not None]
    for code in codes:
        if code not in (EXIT_OK, EXIT_PARTIAL):
            return code
    return EXIT_PARTIAL if EXIT_PARTIAL in codes else EXIT_OK


@click.command("run")
@click.argument("profile")
@click.option("--metrics-file", help="Write a Prometheus textfile here (atomically).")
@click.pass_obj
def command(settings: Settings, profile: str, metrics_file: str | None) -> int:
    """Run PROFILE's job: backup, then forget/prune by its policy, then check.

    With recovery_recipients in the profile, first make sure the repository key is
    escrowed to them (see `cairn key --help`).

    Exit code: 0 when every step succeeded, 3 when the backup could not read
    some files and nothing else failed, otherwise the first failing step's code.
    """
    if settings.profile != profile or settings.job is None:
        settings = settings.with_profile(profile)
    assert settings.job is not None  # with_profile raises when the profile is missing
    job = settings.job
    run_id = logsetup.RUN_CONTEXT.get("run_id")
    logsetup.configure_logging(settings, "run", run_id=run_id)  # the profile may name a log file
    path = metrics_file or job.get("metrics_file")
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        # Found now, not after the backup ran.
        raise ConfigError(f"metrics file {path}: its directory does not exist")
    started_wall = time.time()
    started = time.monotonic()
    steps = plan(job)
    backup = next(s for s in steps if s.name == "backup")
    log.info("run.started", steps=[s.name for s in steps if s.note is None])
    for step in steps:
        if step.note is not None:
            log.info("run.step_skipped", step=step.name, reason=step.note)
            continue
        if step.name in ("forget", "check") and backup.status == "failed":
            step.note = "backup failed"
            log.info("run.step_skipped", step=step.name, reason=step.note)
            continue
        run_step(settings, step)
        if step.exit_code == EXIT_INTERRUPTED:
            break
    code = exit_code_of(steps)
    summary = _summary(profile, steps, code, time.monotonic() - started)
    log.info(
        "run.finished",
        exit_code=code,
        duration=summary["duration_seconds"],
        snapshot_id=summary["snapshot_id"],
        bytes_added=summary["bytes_added"],
        files=summary["files"],
    )
    if path:
        try:
            finished = started_wall + summary["duration_seconds"]
            write_metrics(path, profile, summary, finished=finished)
        except OSError as exc:  # the job ran; a missing metrics dir must not hide its result
            log.error("run.metrics_failed", path=path, error=str(exc))
            print_warning(f"cannot write metrics file {path}: {exc}", settings.json)
        else:
            log.info("run.metrics_written", path=path)
    url = job.get("ping_url_success" if code == EXIT_OK else "ping_url_failure")
    if url:
        ping(
            url,
            summary,
            method=job.get("ping_method", "GET"),
            timeout=float(job.get("ping_timeout", 10)),
            as_json=settings.json,
        )
    _print(settings, summary)
    return code


def _summary(profile: str, steps: list[Step], code: int, seconds: float) -> dict[str, Any]:
    backup = next((s for s in steps if s.name == "backup"), None)
    result = backup.meta.get("cairn.backup.result") if backup else None
    s = result["summary"] if result else {}
    return {
        "message_type": "summary",
        "command": "run",
        "profile": profile,
        "exit_code": code,
        "duration_seconds": round(seconds, 3),
        "snapshot_id": result["snapshot_id"] if result else None,
        "bytes_added": s.get("data_added", 0),
        "files": s.get("total_files_processed", 0),
        "backup_errors": s.get("errors", 0),
        "steps": [step.as_json() for step in steps],
    }


def _print(settings: Settings, summary: dict[str, Any]) -> None:
    if settings.json:
        click.echo(json.dumps(summary))
        return
    if settings.quiet and summary["exit_code"] == EXIT_OK:
        return
    click.echo(
        f"run {summary['profile']}: exit code {summary['exit_code']} "
        f"in {summary['duration_seconds']:.1f}s"
    )
    for step in summary["steps"]:
        detail = step["error"] or step["note"] or ""
        code = "" if step["exit_code"] is None else f" (exit {step['exit_code']})"
        click.echo(f"  {step['step']:<7} {step['status']}{code}{': ' + detail if detail else ''}")


# -- Prometheus textfile -------------------------------------------------------------

_METRICS = {
    "cairn_last_success_timestamp_seconds": "Unix time of the last run that exited 0.",
    "cairn_duration_seconds": "Duration of the last run.",
    "cairn_bytes_added": "Bytes of new data the last run's backup added (before compression).",
    "cairn_files": "Files the last run's backup processed.",
    "cairn_exit_code": "Exit code of the last run.",
}
_SAMPLE = re.compile(r'^(\w+)\{profile="((?:[^"\\]|\\.)*)"\}\s+(\S+)\s*$')


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _read_samples(path: str) -> dict[tuple[str, str], str]:
    """Samples already in the file (other profiles', and our last success time)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    samples = {}
    for line in lines:
        m = _SAMPLE.match(line)
        if m and m[1] in _METRICS:
            samples[(m[1], m[2])] = m[3]
    return samples


def write_metrics(path: str, profile: str, summary: dict[str, Any], *, finished: float) -> None:
    """Write the run's metrics, keeping other profiles' samples; atomic via rename.

    ``cairn_last_success_timestamp_seconds`` keeps its previous value after a failed
    run, so an alert on its age fires however the job fails.
    """
    samples = _read_samples(path)
    key = _label(profile)
    ok = summary["exit_code"] == EXIT_OK
    values = {
        "cairn_duration_seconds": summary["duration_seconds"],
        "cairn_bytes_added": summary["bytes_added"],
        "cairn_files": summary["files"],
        "cairn_exit_code": summary["exit_code"],
    }
    if ok:
        values["cairn_last_success_timestamp_seconds"] = round(finished, 3)
    for name, value in values.items():
        samples[(name, key)] = str(value)
    lines = []
    for name, help_text in _METRICS.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for (metric, label), value in sorted(samples.items()):
            if metric == name:
                lines.append(f'{name}{{profile="{label}"}} {value}')
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".cairn-metrics-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# -- ping ------------------------------------------------------------------------------


def ping(
    url: str,
    summary: dict[str, Any],
    *,
    method: str = "GET",
    timeout: float = 10,
    as_json: bool = False,
) -> bool:
    """Tell a monitor (healthchecks.io, Uptime Kuma …) how the run went.

    POST sends the run summary as JSON. A failed ping is logged and reported on
    stderr but does not change the exit code: the job itself did what it did.
    """
    data = json.dumps(summary).encode() if method == "POST" else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = response.status
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        log.warning("run.ping_failed", url=_safe_url(url), error=str(reason))
        print_warning(f"ping {_safe_url(url)} failed: {reason}", as_json)
        return False
    log.info("run.pinged", url=_safe_url(url), status=status)
    return True


def _safe_url(url: str) -> str:
    """The URL without credentials or query (ping URLs often embed a secret token)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def print_warning(message: str, as_json: bool) -> None:
    """``cairn: warning: …`` on stderr, or a JSON ``warning`` line with ``--json``."""
    if as_json:
        click.echo(json.dumps({"message_type": "warning", "message": message}), err=True)
    else:
        click.echo(f"cairn: warning: {message}", err=True)
