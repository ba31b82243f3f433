"""Building trees with every kind of entry, and comparing two trees exactly."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def make_everything_tree(root: Path) -> None:
    """Regular, empty, sparse and large files, dirs, symlinks, hardlinks, FIFOs,
    device nodes, special mode bits, owners, xattrs, odd and long names."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty-dir").mkdir()
    (root / "empty-file").write_bytes(b"")
    (root / "small.txt").write_text("hello world\n" * 10)
    (root / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    (root / "text.log").write_bytes(b"".join(b"line %d of a log\n" % i for i in range(200_000)))
    with open(root / "sparse.img", "wb") as f:
        f.seek(20 * 1024 * 1024)
        f.write(b"end")
    nested = root / "a" / "b" / "c"
    nested.mkdir(parents=True)
    (nested / "deep.txt").write_text("deep")
    (root / "link-rel").symlink_to("small.txt")
    (root / "link-abs").symlink_to("/nonexistent/target")
    (root / "link-dir").symlink_to("a")
    os.link(root / "small.txt", root / "hardlink.txt")
    os.mkfifo(root / "fifo")
    bad_name = os.fsencode(str(root)) + b"/not-utf8-\xff\xfe.txt"
    with open(bad_name, "wb") as f:
        f.write(b"latin1")
    long_dir = root
    for i in range(12):
        long_dir = long_dir / (f"{i:02d}-" + "x" * 200)
    long_dir.mkdir(parents=True)
    (long_dir / ("y" * 250)).write_text("far away")
    setuid = root / "setuid"
    setuid.write_text("#!/bin/sh\n")
    os.chmod(setuid, 0o4755 | stat.S_ISGID)
    sticky = root / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    readonly = root / "readonly-dir"
    readonly.mkdir()
    (readonly / "inside").write_text("locked in")
    os.setxattr(root / "small.txt", "user.comment", b"an extended attribute")
    os.setxattr(root / "a", "user.dirattr", b"\x00\x01binary")
    if os.geteuid() == 0:
        os.mknod(root / "chardev", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "blockdev", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
        os.chown(root / "small.txt", 1234, 5678)
        os.lchown(root / "link-rel", 4321, 8765)
    os.chmod(readonly, 0o555)
    # A fixed, old mtime makes time comparisons meaningful.
    os.utime(root / "small.txt", ns=(1_000_000_000_123_456_789, 1_100_000_000_987_654_321))


def snapshot_of(root: Path) -> dict[bytes, tuple]:
    """Everything restore must reproduce, per relative path."""
    out: dict[bytes, tuple] = {}
    base = os.fsencode(str(root))
    inodes: dict[int, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = f.read()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            try:
                xattrs = tuple(
                    sorted(
                        (n, os.getxattr(path, n, follow_symlinks=False))
                        for n in os.listxattr(path, follow_symlinks=False)
                    )
                )
            except OSError:
                xattrs = ()
            link_group = None
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                link_group = inodes.setdefault(st.st_ino, rel)
            mtime = st.st_mtime_ns
            out[rel] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                mtime,
                content,
                xattrs,
                st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0,
                link_group,
            )
    return out
