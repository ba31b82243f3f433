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


def read_xattrs(dir_fd: int, name: bytes) -> dict[bytes, bytes]:
    """Extended attributes of entry ``name`` in ``dir_fd`` (not following a symlink);
    empty if unsupported.

    Linux has no ``*xattrat`` call before 6.13 and none taking an ``O_PATH``
    descriptor, so the entry is reached as ``/proc/self/fd/N/name``: a short path
    whatever the depth, resolved from the directory's descriptor. It costs ~3 µs
    more than a plain path, which is why regular files, the bulk of a tree, have
    theirs read through the descriptor their content is read from
    (:func:`read_xattrs_fd`).
    """
    return _xattrs(b"/proc/self/fd/%d/%s" % (dir_fd, name))


def read_xattrs_fd(fd: int) -> dict[bytes, bytes]:
    """Extended attributes of an open file (``flistxattr``: ~0.6 µs when none)."""
    return _xattrs(fd)


def _xattrs(ref: bytes | int) -> dict[bytes, bytes]:
    # A descriptor is the file itself; a path is not followed if it is a symlink.
    nofollow = {} if isinstance(ref, int) else {"follow_symlinks": False}
    try:
        names = os.listxattr(ref, **nofollow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT, errno.EPERM):
            return {}
        raise
    out: dict[bytes, bytes] = {}
    for key in names:
        try:
            out[key.encode("utf-8", "surrogateescape")] = os.getxattr(ref, key, **nofollow)
        except OSError:
            continue  # vanished or unreadable attribute: not worth failing the file
    return out


def node_from_stat(name: bytes, st: os.stat_result, dir_fd: int) -> Node:
    """A tree node for entry ``name`` of directory ``dir_fd`` from its lstat result;
    link target and xattrs are read relative to ``dir_fd``, so any depth works.

    A regular file's content *and xattrs* are filled in later: read through its
    descriptor with its content (:func:`read_xattrs_fd`), or taken from the parent
    snapshot when the file is unchanged (its ctime, which every xattr change
    updates, vouches for them).
    """
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
        link_target=os.readlink(name, dir_fd=dir_fd) if kind == "symlink" else b"",
        xattrs=read_xattrs(dir_fd, name) if kind not in ("symlink", "file") else {},
        rdev=st.st_rdev if kind in ("chardev", "blockdev") else 0,
    )


def create_special(dir_fd: int, name: bytes, node: Node) -> None:
    """Create a symlink, FIFO, device node or socket placeholder ``name`` in ``dir_fd``."""
    if node.type == "symlink":
        os.symlink(node.link_target, name, dir_fd=dir_fd)
    elif node.type == "fifo":
        os.mkfifo(name, 0o600, dir_fd=dir_fd)
    elif node.type in ("chardev", "blockdev"):
        kind = stat.S_IFCHR if node.type == "chardev" else stat.S_IFBLK
        os.mknod(name, 0o600 | kind, node.rdev, dir_fd=dir_fd)
    elif node.type == "socket":
        # A socket cannot be restored meaningfully; restic skips them too.
        return


def apply_metadata_at(dir_fd: int, name: bytes, node: Node) -> list[str]:
    """Set the metadata of entry ``name`` in ``dir_fd`` without following a symlink
    and without a path longer than one component; returns warnings (see
    :func:`apply_metadata_fd`)."""
    if node.type == "symlink":
        return _apply(name, node, dir_fd=dir_fd)
    # An O_PATH descriptor pins the very inode (never a symlink planted there) even
    # when it cannot be opened for reading (mode 000, a FIFO); /proc/self/fd/N
    # reaches it for the calls that take no descriptor of that kind.
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        return [f"open: {exc.strerror}"]
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            return ["replaced by a symlink during the restore; metadata not set"]
        return _apply(f"/proc/self/fd/{fd}", node)
    finally:
        os.close(fd)


def apply_metadata_fd(fd: int, node: Node) -> list[str]:
    """Set owner (as root), xattrs, mode and times on an open file or directory;
    returns warnings, never raises for metadata the target filesystem cannot hold."""
    return _apply(fd, node)


def _apply(ref: int | str | bytes, node: Node, dir_fd: int | None = None) -> list[str]:
    """chown (as root), xattrs, chmod (after chown, which clears setuid bits), times.

    ``ref`` is a descriptor, a /proc/self/fd path, or (symlinks) a name in ``dir_fd``.
    """
    warnings: list[str] = []
    is_link = node.type == "symlink"
    at: dict[str, object] = {} if dir_fd is None else {"dir_fd": dir_fd}
    nofollow: dict[str, object] = {"follow_symlinks": False} if is_link else {}
    if IS_ROOT:
        # Names win over numbers, as in tar and restic: the restore host may
        # number its users differently.
        named_uid = uid_for(node.user) if node.user else None
        named_gid = gid_for(node.group) if node.group else None
        uid = node.uid if named_uid is None else named_uid
        gid = node.gid if named_gid is None else named_gid
        try:
            os.chown(ref, uid, gid, **at, **nofollow)  # type: ignore[arg-type]
        except OSError as exc:
            warnings.append(f"chown: {exc.strerror}")
    if not is_link:
        for key, value in node.xattrs.items():
            try:
                os.setxattr(ref, key, value)
            except OSError as exc:
                warnings.append(f"xattr {key!r}: {exc.strerror}")
        try:
            os.chmod(ref, node.mode)
        except OSError as exc:
            warnings.append(f"chmod: {exc.strerror}")
    try:
        os.utime(ref, ns=(node.atime_ns, node.mtime_ns), **at, **nofollow)  # type: ignore[arg-type]
    except OSError as exc:
        warnings.append(f"utime: {exc.strerror}")
    return warnings
