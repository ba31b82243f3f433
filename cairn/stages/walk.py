"""Scanning directories into tree nodes (blocking; run in threads, one call per dir)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from cairn.repo.tree import Node
from cairn.stages.excludes import ExcludeRules
from cairn.stages.fsmeta import node_from_stat


@dataclass
class ScanResult:
    """One directory's entries, sorted by name, and what went wrong reading them."""

    nodes: list[Node] = field(default_factory=list)
    # Names of subdirectories on another device than ``root_device`` (mount points).
    mountpoints: set[bytes] = field(default_factory=set)
    warnings: list[tuple[bytes, str]] = field(default_factory=list)
    excluded: int = 0


def scan_dir(path: bytes, rules: ExcludeRules, root_device: int | None) -> ScanResult:
    """List ``path`` and build a node for every entry that is not excluded."""
    result = ScanResult()
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except OSError as exc:
        result.warnings.append((path, exc.strerror or str(exc)))
        return result
    names = {e.name for e in entries}
    if rules.if_present and rules.excluded_dir_contents(path, names):
        result.excluded += len(entries)
        return result
    for entry in entries:
        name: bytes = entry.name
        full = path.rstrip(b"/") + b"/" + name
        if rules.excluded_path(full):
            result.excluded += 1
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and rules.too_large(st.st_size):
                result.excluded += 1
                continue
            if root_device is not None and stat.S_ISDIR(st.st_mode) and st.st_dev != root_device:
                result.mountpoints.add(name)
            result.nodes.append(node_from_stat(name, full, st))
        except FileNotFoundError:
            result.warnings.append((full, "vanished before it could be read"))
        except OSError as exc:
            result.warnings.append((full, exc.strerror or str(exc)))
    result.nodes.sort(key=lambda n: n.name)
    return result


def stat_path(path: bytes) -> Node:
    """The node of one path given on the command line (its last component as name)."""
    st = os.lstat(path)
    name = os.path.basename(path.rstrip(b"/")) or b"/"
    return node_from_stat(name, path, st)
