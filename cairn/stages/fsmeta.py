"""File metadata: reading it into tree nodes, and applying it on restore.

Everything here is plain blocking filesystem code; callers run it in threads.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from functools import lru_cache

from cairn.repo.tree import Node

_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFSOCK: "socket",
}
IS_ROOT = os.geteuid() == 0


@lru_cache(maxsize=4096)
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


@lru_cache(maxsize=4096)
def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return ""


@lru_cache(maxsize=4096)
def uid_for(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


@lru_cache(maxsize=4096)
def gid_for(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def node_type(mode: int) -> str:
    return _TYPES.get(stat.S_IFMT(mode), "file")


def read_xattrs(path: bytes) -> dict[bytes, bytes]:
    """Extended attributes of ``path`` (not following symlinks); empty if unsupported."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT, errno.EPERM):
            return {}
        raise
    out: dict[bytes, bytes] = {}
    for name in names:
        try:
            out[name.encode("utf-8", "surrogateescape")] = os.getxattr(
                path, name, follow_symlinks=False
            )
        except OSError:
            continue  # vanished or unreadable attribute: not worth failing the file
    return out


def node_from_stat(name: bytes, path: bytes, st: os.stat_result) -> Node:
    """A tree node for ``path`` from its lstat result (content filled in later)."""
    kind = node_type(st.st_mode)
    return Node(
        type=kind,
        name=name,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        user=user_name(st.st_uid),
        group=group_name(st.st_gid),
        mtime_ns=st.st_mtime_ns,
        atime_ns=st.st_atime_ns,
        ctime_ns=st.st_ctime_ns,
        inode=st.st_ino,
        device=st.st_dev,
        links=st.st_nlink,
        size=st.st_size if kind == "file" else 0,
        link_target=os.readlink(path) if kind == "symlink" else b"",
        xattrs=read_xattrs(path) if kind != "symlink" else {},
        rdev=st.st_rdev if kind in ("chardev", "blockdev") else 0,
    )


def create_special(path: bytes, node: Node) -> None:
    """Create a symlink, FIFO, device node or socket placeholder at ``path``."""
    if node.type == "symlink":
        os.symlink(node.link_target, path)
    elif node.type == "fifo":
        os.mkfifo(path, 0o600)
    elif node.type in ("chardev", "blockdev"):
        kind = stat.S_IFCHR if node.type == "chardev" else stat.S_IFBLK
        os.mknod(path, 0o600 | kind, node.rdev)
    elif node.type == "socket":
        # A socket cannot be restored meaningfully; restic skips them too.
        return


def apply_metadata(path: bytes, node: Node, *, numeric_owner: bool = False) -> list[str]:
    """Set owner (as root), mode, xattrs and times; returns warnings, never raises
    for metadata the target filesystem cannot hold."""
    warnings: list[str] = []
    is_link = node.type == "symlink"
    if IS_ROOT:
        uid, gid = node.uid, node.gid
        if not numeric_owner:
            # Names win over numbers, as in tar and restic: the restore host may
            # number its users differently.
            named_uid = uid_for(node.user) if node.user else None
            named_gid = gid_for(node.group) if node.group else None
            uid = node.uid if named_uid is None else named_uid
            gid = node.gid if named_gid is None else named_gid
        try:
            os.chown(path, uid, gid, follow_symlinks=False)
        except OSError as exc:
            warnings.append(f"chown: {exc.strerror}")
    if not is_link:
        for key, value in node.xattrs.items():
            try:
                os.setxattr(path, key, value, follow_symlinks=False)
            except OSError as exc:
                warnings.append(f"xattr {key!r}: {exc.strerror}")
        try:
            os.chmod(path, node.mode)
        except OSError as exc:
            warnings.append(f"chmod: {exc.strerror}")
    try:
        os.utime(path, ns=(node.atime_ns, node.mtime_ns), follow_symlinks=False)
    except OSError as exc:
        warnings.append(f"utime: {exc.strerror}")
    return warnings
