"""Shared-memory slots: how bulk bytes cross into worker processes without pickling.

A :class:`SlotPool` owns one anonymous shared-memory file (``memfd_create``)
cut into fixed-size slots. A slot is acquired (waiting while all are in use:
that wait is the backpressure that bounds memory), filled, described to a
worker by a small picklable :class:`SlotRef`, and released for reuse.

The memory has no name: the kernel frees it when the last process holding it
(the parent's descriptor, a worker's mapping) is gone — also when the whole
process group is SIGKILLed, which left named ``/dev/shm`` segments behind
until reboot. A worker maps a pool's memory once and keeps it for the run: the
pool hands the worker its descriptor over the worker's socket (SCM_RIGHTS,
:mod:`cairn.pipeline.workers`) with the first job that refers to it; a reference
that arrives any other way is mapped by opening ``/proc/<owner pid>/fd/<n>``.
"""

from __future__ import annotations

import mmap
import os
import secrets
from typing import NamedTuple

import anyio

#: Prefix of every memory file's name (shown in ``/proc/PID/fd`` as
#: ``/memfd:cairn_<token> (deleted)``) and of the named ``/dev/shm`` segments
#: older versions created.
SEGMENT_PREFIX = "cairn_"

# Pools' memory mapped in this process, by segment key: the pool's own in the
# parent, attached ones in workers.
_mapped: dict[str, memoryview] = {}
# The memory files of this process's own pools, by segment key.
_owned: dict[str, int] = {}
_swept = False


class SlotRef(NamedTuple):
    """Picklable description of bytes in a slot: segment key, offset, length."""

    segment: str  # "<pid>:<fd>:<token>" of the pool's memory file in its owner
    offset: int
    length: int

    def view(self) -> memoryview:
        """A writable memoryview of the described bytes, in any process."""
        buf = _mapped.get(self.segment)
        if buf is None:
            buf = _mapped[self.segment] = _attach(self.segment)
        return buf[self.offset : self.offset + self.length]


def owned_fd(segment: str) -> int | None:
    """The descriptor of ``segment`` if this process's pool owns it, else None."""
    return _owned.get(segment)


def adopt(segment: str, fd: int) -> None:
    """Map ``segment`` from a descriptor received from its owner; closes ``fd``."""
    try:
        if segment not in _mapped:
            _mapped[segment] = memoryview(mmap.mmap(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def _attach(segment: str) -> memoryview:
    """Map another process's pool memory through its ``/proc`` fd entry (for a
    reference whose memory was not handed over with the job, e.g. a nested one)."""
    pid, fd, token = segment.split(":")
    handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    try:
        # Opened first, checked second: the fd number could have been reused
        # for another file since the reference was made, the open file cannot.
        target = os.readlink(f"/proc/self/fd/{handle}")
        if not target.startswith(f"/memfd:{SEGMENT_PREFIX}{token}"):
            raise RuntimeError(f"shared memory {segment} is gone (found {target})")
        return memoryview(mmap.mmap(handle, os.fstat(handle).st_size))
    finally:
        os.close(handle)


def sweep_stale_segments(directory: str = "/dev/shm") -> list[str]:
    """Remove ``cairn_<pid>_*`` segments whose creating process is gone.

    Versions before memfd slots named their memory there, and a killed run
    left it until reboot. Returns the names removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(SEGMENT_PREFIX):
            continue
        owner = name[len(SEGMENT_PREFIX) :].split("_", 1)[0]
        if not owner.isdigit() or os.path.exists(f"/proc/{owner}"):
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            continue  # someone else's, or already gone
        removed.append(name)
    return removed


class Slot:
    """One slot of a :class:`SlotPool`, held by one task until :meth:`release`."""

    __slots__ = ("_pool", "index", "view")

    def __init__(self, pool: SlotPool, index: int, view: memoryview) -> None:
        self._pool: SlotPool | None = pool
        self.index = index
        #: The whole slot, writable; fill it (e.g. ``file.readinto(slot.view)``).
        self.view = view

    @property
    def size(self) -> int:
        """Capacity of the slot in bytes."""
        return len(self.view)

    def ref(self, length: int | None = None, offset: int = 0) -> SlotRef:
        """Describe ``length`` bytes (default: the rest of the slot) for a worker."""
        if self._pool is None:
            raise RuntimeError("slot used after release")
        end = self.size if length is None else offset + length
        if not 0 <= offset <= end <= self.size:
            raise ValueError(f"range {offset}:{end} outside slot of {self.size} bytes")
        return SlotRef(self._pool.name, self.index * self._pool.slot_size + offset, end - offset)

    def release(self) -> None:
        """Return the slot to its pool; calling it twice is harmless."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._free(self.index)


class SlotPool:
    """A fixed number of equal slots in one anonymous shared-memory file.

    Create it in the parent; close it in a ``finally`` —
    :class:`~cairn.pipeline.engine.Engine` does both. Even without ``close``
    the memory is freed when the process and its workers exit, however they end.
    """

    def __init__(self, slot_size: int, slot_count: int) -> None:
        global _swept
        if slot_size < 1 or slot_count < 1:
            raise ValueError("slot_size and slot_count must be positive")
        if not _swept:
            _swept = True
            sweep_stale_segments()
        self.slot_size = slot_size
        self.slot_count = slot_count
        self.nbytes = slot_size * slot_count
        token = secrets.token_hex(4)
        self._fd = os.memfd_create(f"{SEGMENT_PREFIX}{token}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, self.nbytes)
            self._mmap = mmap.mmap(self._fd, self.nbytes)
        except BaseException:
            os.close(self._fd)
            raise
        self._buf = memoryview(self._mmap)
        self.name = f"{os.getpid()}:{self._fd}:{token}"
        _mapped[self.name] = self._buf
        _owned[self.name] = self._fd
        # One token per free slot travels through a memory stream: acquire()
        # waits on an empty stream exactly like a stage waits on a full channel.
        self._free_tx, self._free_rx = anyio.create_memory_object_stream[None](slot_count)
        # Which slots are free: a stack, so the slot released last is used next.
        # Pages of the memory file are allocated when first written; a run that
        # needs few slots at a time keeps reusing the same ones and never pays
        # for the rest (a no-change or small incremental backup).
        self._free_stack = list(range(slot_count - 1, -1, -1))
        for _ in range(slot_count):
            self._free_tx.send_nowait(None)

    @property
    def in_use(self) -> int:
        """Slots currently held."""
        return self.slot_count - self._free_rx.statistics().current_buffer_used

    async def acquire(self) -> Slot:
        """Take a free slot, waiting until one is released if all are in use."""
        await self._free_rx.receive()
        index = self._free_stack.pop()
        start = index * self.slot_size
        return Slot(self, index, self._buf[start : start + self.slot_size])

    def _free(self, index: int) -> None:
        try:
            self._free_tx.send_nowait(None)
            self._free_stack.append(index)
        except anyio.ClosedResourceError:
            pass  # released after close(): nothing left to recycle into

    def close(self) -> None:
        """Unmap the memory and close its descriptor. Idempotent; safe in ``finally``."""
        if _mapped.pop(self.name, None) is None:
            return
        _owned.pop(self.name, None)
        self._free_tx.close()
        self._free_rx.close()
        os.close(self._fd)  # first: workers can no longer attach
        self._buf.release()
        try:
            self._mmap.close()
        except BufferError:
            # A caller still holds a view of a slot: the mapping goes when the
            # last such view is collected.
            pass


class SlotWriter:
    """Append variable-size outputs into a slot's view (used inside workers).

    ``write`` returns the ``(offset, length)`` written, or ``None`` when the
    data does not fit, so the caller can fall back to returning the bytes.
    """

    __slots__ = ("pos", "view")

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.pos = 0

    def write(self, data: bytes | memoryview) -> tuple[int, int] | None:
        """Copy ``data`` after what was written so far; ``None`` if full."""
        n = len(data)
        if self.pos + n > len(self.view):
            return None
        start, self.pos = self.pos, self.pos + n
        self.view[start : self.pos] = data
        return start, n
