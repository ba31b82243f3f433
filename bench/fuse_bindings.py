"""Per-request cost of the FUSE bindings cairn could use (docs/architecture.md, "Mount").

    python -m bench.fuse_bindings MODE MOUNTPOINT

MODE: ``asyncio`` (pyfuse3 with ``pyfuse3.asyncio``), ``cairn`` (pyfuse3 with
``cairn.mount.aioloop``), ``trio`` (pyfuse3's own) or ``mfusepy``. A trivial in-memory
filesystem: ``ls -lR`` of 4,000 files (readdirplus and two ``getxattr`` per file) and
``cat`` of a 256 MiB file. Run each mode several times: the numbers are small.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
import time
from typing import Any

N = 4000
BIG = 256 * 1024 * 1024
CHUNK = bytes(1024 * 1024)
NAMES = [b"f%05d" % i for i in range(N)]


def run_client(mp: str) -> tuple[float, float]:
    while not os.path.ismount(mp):
        time.sleep(0.05)
    t = time.perf_counter()
    subprocess.run(f"ls -lR {mp}/d > /dev/null", shell=True, check=True)
    listing = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run(f"cat {mp}/big > /dev/null", shell=True, check=True)
    return listing, time.perf_counter() - t


def data(off: int, size: int) -> bytes:
    return CHUNK[: max(0, min(off + size, BIG) - off)]


def in_thread(mp: str, result: dict[str, Any]) -> None:
    def client() -> None:
        result["r"] = run_client(mp)
        subprocess.run(["fusermount3", "-u", mp], check=False)

    threading.Thread(target=client).start()


def pyfuse3_main(mode: str, mp: str) -> tuple[float, float]:
    import pyfuse3

    class FS(pyfuse3.Operations):
        def attr(self, ino: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = ino  # type: ignore[assignment]
            if ino in (1, 2):
                a.st_mode = stat.S_IFDIR | 0o755  # type: ignore[assignment]
            else:
                a.st_mode = stat.S_IFREG | 0o644  # type: ignore[assignment]
                a.st_size = BIG if ino == 3 else 10
            a.attr_timeout = a.entry_timeout = 300
            return a

        async def getattr(self, ino: Any, ctx: Any = None) -> pyfuse3.EntryAttributes:
            return self.attr(ino)

        async def lookup(self, p: Any, name: Any, ctx: Any = None) -> pyfuse3.EntryAttributes:
            if p == 1 and name in (b"d", b"big"):
                return self.attr(2 if name == b"d" else 3)
            if p == 2:
                return self.attr(10 + int(name[1:]))
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def opendir(self, ino: Any, ctx: Any) -> Any:
            return ino

        async def readdir(self, fh: Any, start: int, token: Any) -> None:
            items = (
                [(b"d", 2), (b"big", 3)] if fh == 1 else [(n, 10 + i) for i, n in enumerate(NAMES)]
            )
            for i in range(start, len(items)):
                if not pyfuse3.readdir_reply(token, items[i][0], self.attr(items[i][1]), i + 1):
                    return

        async def getxattr(self, ino: Any, name: Any, ctx: Any) -> bytes:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

        async def open(self, ino: Any, flags: Any, ctx: Any) -> pyfuse3.FileInfo:
            return pyfuse3.FileInfo(fh=ino)

        async def read(self, fh: Any, off: int, size: int) -> bytes:
            return data(off, size)

    if mode == "asyncio":
        import pyfuse3.asyncio

        pyfuse3.asyncio.enable()
    elif mode == "cairn":
        from cairn.mount import aioloop

        aioloop.enable()
    pyfuse3.init(FS(), mp, {"ro", "fsname=bench"})
    result: dict[str, Any] = {}
    in_thread(mp, result)
    if mode == "trio":
        import trio

        trio.run(pyfuse3.main)
    else:
        import asyncio

        asyncio.run(pyfuse3.main())
    pyfuse3.close(unmount=False)
    return result["r"]  # type: ignore[no-any-return]


def mfusepy_main(mp: str) -> tuple[float, float]:
    import mfusepy

    class FS(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
            if path in ("/", "/d"):
                return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
            if path == "/big":
                return {"st_mode": stat.S_IFREG | 0o644, "st_size": BIG, "st_nlink": 1}
            if path.startswith("/d/f"):
                return {"st_mode": stat.S_IFREG | 0o644, "st_size": 10, "st_nlink": 1}
            raise mfusepy.FuseOSError(errno.ENOENT)

        def readdir(self, path: str, fh: Any) -> list[str]:
            if path == "/":
                return [".", "..", "d", "big"]
            return [".", "..", *(n.decode() for n in NAMES)]

        def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
            raise mfusepy.FuseOSError(errno.ENODATA)

        def open(self, path: str, flags: int) -> int:
            return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return data(offset, size)

    result: dict[str, Any] = {}
    in_thread(mp, result)
    mfusepy.FUSE(FS(), mp, foreground=True, ro=True, attr_timeout=300, entry_timeout=300)
    return result["r"]  # type: ignore[no-any-return]


def main() -> None:
    mode, mp = sys.argv[1], sys.argv[2]
    os.makedirs(mp, exist_ok=True)
    listing, read = mfusepy_main(mp) if mode == "mfusepy" else pyfuse3_main(mode, mp)
    print(f"{mode:8} ls -lR of {N} files: {listing:.2f} s   read 256 MiB: {read:.2f} s")


if __name__ == "__main__":
    main()
