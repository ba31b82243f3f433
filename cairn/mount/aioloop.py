"""pyfuse3 on asyncio, without re-registering the FUSE descriptor for every request.

pyfuse3 is written against trio; ``pyfuse3.asyncio.enable()`` hands it a stand-in
module whose ``wait_readable`` adds an asyncio reader for the FUSE descriptor before
each request and removes it after (two ``epoll_ctl`` calls, a future and a callback
per request). Measured here (``bench/fuse_bindings.py``, docs/architecture.md), that
made ``ls -lR`` of 4,000 files (a readdirplus, two ``getxattr`` per file) take 1.4 to
2.3 times as long as with this stand-in, and longer than on trio or with mfusepy.

:func:`enable` installs the same stand-in with two functions replaced:

* :func:`wait_readable` keeps the descriptor registered while requests keep coming.
  pyfuse3 lets one task at a time wait for it (its read lock), so one waiter is
  woken per readiness. The reader is removed only when the descriptor stays
  readable with nobody waiting (every worker task busy): then asyncio's
  level-triggered readiness would wake the loop in a busy circle.
  A wake-up is checked with a zero-timeout ``poll`` before pyfuse3's blocking read:
  a readiness callback queued before the previous reader took its request may
  arrive after the next reader started waiting.
* :func:`notify_closing` wakes that waiter with ``ClosedResourceError`` unless it was
  just woken by readiness (pyfuse3's version then raises ``InvalidStateError``).
"""

from __future__ import annotations

import asyncio
import select
import sys
import types
from dataclasses import dataclass
from typing import Any

# Readiness callbacks with nobody waiting before the reader is paused: the first one
# or two come while the woken task has not yet run and read its request.
_IDLE_WAKEUPS = 2


@dataclass
class _Fd:
    loop: asyncio.AbstractEventLoop
    poller: select.poll
    waiter: asyncio.Future[None] | None = None
    registered: bool = False
    idle: int = 0


_fds: dict[int, _Fd] = {}


def _ready(fd: int) -> None:
    state = _fds[fd]
    waiter, state.waiter = state.waiter, None
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
        return
    state.idle += 1
    if state.idle > _IDLE_WAKEUPS:
        state.loop.remove_reader(fd)
        state.registered = False


async def wait_readable(fd: int) -> None:
    """Wait until ``fd`` is readable (one waiter at a time, as pyfuse3 ensures)."""
    loop = asyncio.get_running_loop()
    state = _fds.get(fd)
    if state is None or state.loop is not loop:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        state = _fds[fd] = _Fd(loop, poller)
    while True:
        waiter = state.waiter = loop.create_future()
        state.idle = 0
        if not state.registered:
            loop.add_reader(fd, _ready, fd)
            state.registered = True
        try:
            await waiter
        finally:
            if state.waiter is waiter:
                state.waiter = None
        # A readiness callback queued before the previous reader took its request
        # may wake this one for a request that is gone: pyfuse3's read would then
        # block the whole loop. Look again.
        if state.poller.poll(0):
            return


def notify_closing(fd: int) -> None:
    """The session is ending: stop watching ``fd`` and wake its waiter."""
    state = _fds.pop(fd, None)
    if state is None:
        return
    if state.registered:
        state.loop.remove_reader(fd)
    waiter = state.waiter
    if waiter is not None and not waiter.done():
        waiter.set_exception(_stand_in().ClosedResourceError())


def _stand_in() -> Any:
    import pyfuse3.asyncio

    return pyfuse3.asyncio


def enable() -> None:
    """Run pyfuse3 on asyncio (instead of ``pyfuse3.asyncio.enable()``)."""
    import pyfuse3

    base = _stand_in()
    shim = types.ModuleType("cairn.mount.pyfuse3_trio")
    shim.__dict__.update(
        {k: v for k, v in vars(base).items() if not k.startswith("__")},
    )
    shim.wait_readable = wait_readable  # type: ignore[attr-defined]
    shim.notify_closing = notify_closing  # type: ignore[attr-defined]
    shim.lowlevel = shim  # type: ignore[attr-defined]
    shim.from_thread = shim  # type: ignore[attr-defined]
    sys.modules.setdefault(shim.__name__, shim)
    pyfuse3.trio = shim  # type: ignore[attr-defined]
