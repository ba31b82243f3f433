"""Walking the trees of a snapshot: the shared part of ls, find, diff and dump."""

from __future__ import annotations

import stat
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from cairn.repo.tree import Node

if TYPE_CHECKING:
    from cairn.repo.repository import Repository

TYPE_CHARS = {
    "file": "-",
    "dir": "d",
    "symlink": "l",
    "fifo": "p",
    "chardev": "c",
    "blockdev": "b",
    "socket": "s",
}


async def walk(
    repo: Repository, tree_id: bytes, prefix: bytes = b""
) -> AsyncIterator[tuple[bytes, Node]]:
    """Every node below ``tree_id`` with its path, depth first, in name order."""
    tree = await repo.load_tree(tree_id)
    for node in tree.nodes:
        path = prefix + b"/" + node.name
        yield path, node
        if node.type == "dir" and node.subtree is not None:
            async for item in walk(repo, node.subtree, path):
                yield item


async def find_node(repo: Repository, root: bytes, path: bytes) -> tuple[bytes | None, Node | None]:
    """The node at ``path`` (and its subtree ID if a directory); ``(root, None)`` for /."""
    tree_id: bytes | None = root
    node: Node | None = None
    for part in [p for p in path.split(b"/") if p]:
        if tree_id is None:
            return None, None
        tree = await repo.load_tree(tree_id)
        node = next((n for n in tree.nodes if n.name == part), None)
        if node is None:
            return None, None
        tree_id = node.subtree if node.type == "dir" else None
    return tree_id, node


def mode_string(node: Node) -> str:
    """``-rwxr-xr-x`` style, with setuid/setgid/sticky letters."""
    return TYPE_CHARS.get(node.type, "?") + stat.filemode(node.mode)[1:]


def long_line(path: bytes, node: Node) -> str:
    mtime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(node.mtime_ns / 1e9))
    owner = node.user or str(node.uid)
    group = node.group or str(node.gid)
    text = path.decode("utf-8", "backslashreplace")
    if node.type == "symlink":
        text += " -> " + node.link_target.decode("utf-8", "backslashreplace")
    return f"{mode_string(node)} {owner:>8} {group:>8} {node.size:>12} {mtime} {text}"


def node_summary(path: bytes, node: Node) -> dict[str, Any]:
    """restic-like JSON of one node for ``ls --json`` and ``find --json``."""
    return {
        "name": node.name.decode("utf-8", "backslashreplace"),
        "type": node.type,
        "path": path.decode("utf-8", "backslashreplace"),
        "uid": node.uid,
        "gid": node.gid,
        "user": node.user,
        "group": node.group,
        "size": node.size,
        "mode": node.mode,
        "permissions": mode_string(node),
        "mtime_ns": node.mtime_ns,
        "atime_ns": node.atime_ns,
        "ctime_ns": node.ctime_ns,
        "inode": node.inode,
        "links": node.links,
        "struct_type": "node",
        "link_target": node.link_target.decode("utf-8", "backslashreplace") or None,
    }
