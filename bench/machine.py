"""Facts about the machine and software a benchmark ran on, for the JSON report."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's processor string)."""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_bytes() -> int:
    """Total RAM in bytes (MemTotal), 0 if unknown."""
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def filesystem_of(path: Path) -> str:
    """Device and type of the filesystem holding ``path`` (longest mount prefix)."""
    best, answer = "", "unknown"
    target = str(path.resolve())
    for line in _read("/proc/mounts").splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        inside = target == fields[1] or target.startswith(fields[1].rstrip("/") + "/")
        if inside and len(fields[1]) > len(best):
            best, answer = fields[1], f"{fields[0]} ({fields[2]}) on {fields[1]}"
    return answer


def os_release() -> str:
    """PRETTY_NAME from /etc/os-release."""
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.platform()


def first_line(argv: list[str]) -> str:
    """First output line of a command, or 'not installed'."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine_info(workdir: Path) -> dict[str, object]:
    """CPU, cores, RAM, kernel, OS, Python, work filesystem, and helper tool versions."""
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_bytes": memory_bytes(),
        "kernel": platform.release(),
        "os": os_release(),
        "python": platform.python_version(),
        "workdir_filesystem": filesystem_of(workdir),
        "loadavg_at_start": list(os.getloadavg()),
        "zstd": first_line(["zstd", "--version"]),
        "tar": first_line(["tar", "--version"]),
    }
