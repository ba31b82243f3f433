"""Scanning directories into tree nodes (blocking; run in threads, one call per dir)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from cairn.repo.tree import Node
from cairn.stages.excludes import ExcludeRules
from cairn.stages.fsmeta import node_from_stat

LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass
class ScanResult:
    """One directory's entries, sorted by name, and what went wrong reading them."""

    nodes: list[Node] = field(default_factory=list)
    # Names of subdirectories on another device than ``root_device`` (mount points).
    mountpoints: set[bytes] = field(default_factory=set)
    warnings: list[tuple[bytes, str]] = field(default_factory=list)
    excluded: int = 0


def scan_dir(dir_fd: int, path: bytes, rules: ExcludeRules, root_device: int | None) -> ScanResult:
    """List the directory open as ``dir_fd`` (absolute ``path``, for excludes and
    messages) and build a node for every entry that is not excluded.

    Everything is relative to ``dir_fd`` (an ``O_PATH`` descriptor; see
    :mod:`cairn.stages.sourcedirs`): the listing opens ``.`` in it for reading,
    which needs read permission on the directory as listing it by path did.
    """
    result = ScanResult()
    try:
        list_fd = os.open(".", LIST_FLAGS, dir_fd=dir_fd)
        try:
            with os.scandir(list_fd) as it:
                # scandir of a descriptor gives str names; the tree stores bytes.
                entries = [os.fsencode(e.name) for e in it]
        finally:
            os.close(list_fd)
    except OSError as exc:
        result.warnings.append((path, exc.strerror or str(exc)))
        return result
    if rules.if_present:
        tags = rules.exclusion_tags(dir_fd, set(entries))
        if tags:  # only the tag files stay, as restic keeps them
            result.excluded += len(entries) - len(tags)
            entries = tags
    prefix = path.rstrip(b"/") + b"/"
    for name in entries:
        full = prefix + name
        if rules.excluded_path(full):
            result.excluded += 1
            continue
        try:
            st = os.lstat(name, dir_fd=dir_fd)
            if stat.S_ISREG(st.st_mode) and rules.too_large(st.st_size):
                result.excluded += 1
                continue
            if root_device is not None and stat.S_ISDIR(st.st_mode) and st.st_dev != root_device:
                result.mountpoints.add(name)
            result.nodes.append(node_from_stat(name, st, dir_fd))
        except FileNotFoundError:
            result.warnings.append((full, "vanished before it could be read"))
        except OSError as exc:
            result.warnings.append((full, exc.strerror or str(exc)))
    result.nodes.sort(key=lambda n: n.name)
    return result


def stat_at(dir_fd: int, name: bytes) -> Node:
    """The node of entry ``name`` in ``dir_fd`` (a component of a path given on the
    command line)."""
    return node_from_stat(name, os.lstat(name, dir_fd=dir_fd), dir_fd)


def stat_at_following(dir_fd: int, name: bytes) -> Node:
    """The node of what entry ``name`` in ``dir_fd`` points to: a symlink *above* a
    path given on the command line is followed, as the kernel follows it for the
    path (``/home -> /data/home`` and ``backup /home/me``)."""
    return node_from_stat(name, os.stat(name, dir_fd=dir_fd), dir_fd)
