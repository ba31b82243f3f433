"""Helpers for the fault campaign: crash a real ``cairn`` command at a chosen backend
write, then prove that nothing was lost.

A run is crashed through the fault wrapper's ``CAIRN_TEST_FAULTS`` spec
(``write#N=kill``: SIGKILL just before the Nth save/remove). The command runs in its
own session so that its worker processes can be killed with it afterwards, as systemd
or ``kill -9`` of the process group would.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from cairn.backends.faulty import ENV_VAR
from tests.cli_helpers import CAIRN, Cairn, Result
from tests.treeutil import snapshot_of

#: ``CAIRN_FULL_SWEEP=1`` crashes every command at every write; otherwise a sample.
FULL_SWEEP = os.environ.get("CAIRN_FULL_SWEEP", "") not in ("", "0")


def sweep_points(sample: tuple[int, ...], limit: int = 200) -> Iterator[int]:
    """The write numbers to crash at: 1, 2, 3, … under a full sweep, else ``sample``.

    A full sweep stops when the caller stops asking (the run completed without
    reaching the Nth write); ``limit`` guards against a command that never completes.
    """
    yield from range(1, limit + 1) if FULL_SWEEP else sample


def run_with_faults(c: Cairn, spec: str, *args: str, timeout: float = 120) -> Result:
    """Run ``cairn ARGS`` with a fault spec; kill whatever it left running."""
    cmd = [*CAIRN, "-r", str(c.repo), "--password-file", str(c.password_file), "--insecure-kdf"]
    cmd += [*c.global_args, *args]
    proc = subprocess.Popen(
        cmd,
        env=c.env | {ENV_VAR: spec},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:  # the process group: pool workers and the resource tracker outlive a SIGKILL
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def killed(result: Result) -> bool:
    return result.code == -signal.SIGKILL


def fresh_copy(template: Cairn, dest: Path, password_file: Path | None = None) -> Cairn:
    """A copy of ``template``'s repository (no cache: each copy starts cold)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(template.repo, dest / "repo")
    pw = dest / "password"
    shutil.copy(password_file or template.password_file, pw)
    return Cairn(dest / "repo", pw)


# Harmless leftovers a crash may leave, as ``check`` words them (warnings, exit 0):
# packs that no index lists (``prune`` deletes them) and stale locks (``unlock``).
HARMLESS = ("not referenced by any index",)


def assert_check_clean(c: Cairn) -> Result:
    """``check`` exits 0 and reports no error; any warning must be a known leftover."""
    r = c.run("check", "--no-cache")
    assert r.code == 0, f"check after crash: exit {r.code}\n{r.out}\n{r.err}"
    for line in r.out.splitlines():
        assert not line.startswith("error"), line
        if line.startswith("warning"):
            assert any(h in line for h in HARMLESS), f"unexpected warning: {line}"
    return r


def assert_restores(
    c: Cairn, expected: dict[str, dict[bytes, tuple]], src: Path, tmp: Path
) -> None:
    """Every snapshot in ``expected`` (ID → ``snapshot_of`` the source then) restores
    byte for byte, metadata included."""
    for i, (snap, want) in enumerate(expected.items()):
        target = tmp / f"restore-{i}"
        if target.exists():
            shutil.rmtree(target)
        r = c.run("restore", "--no-cache", snap, "--target", str(target))
        assert r.code == 0, f"restore {snap[:8]}: exit {r.code}: {r.err}"
        assert snapshot_of(target / src.relative_to("/")) == want, f"snapshot {snap[:8]} differs"
        shutil.rmtree(target)


def snapshot_ids(c: Cairn) -> list[str]:
    r = c.run("snapshots", "--no-cache", "--json", check=True)
    data = r.json() if r.out.lstrip().startswith("[") else r.json_lines()
    return [s["id"] for s in data]
