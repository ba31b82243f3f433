"""Shared-memory slots: how bulk bytes cross into worker processes without pickling.

A :class:`SlotPool` owns one ``multiprocessing.shared_memory`` segment cut into
fixed-size slots. A slot is acquired (waiting while all are in use: that wait
is the backpressure that bounds memory), filled, described to a worker by a
small picklable :class:`SlotRef`, and released for reuse. Workers map a
segment once, on first use, and keep it mapped for the rest of the run.
"""

from __future__ import annotations

import os
import secrets
from multiprocessing import shared_memory
from typing import NamedTuple

import anyio

# Segments mapped in this process, by name: the pool's own in the parent,
# lazily attached ones in workers.
_mapped: dict[str, shared_memory.SharedMemory] = {}

#: Prefix of every segment name, so a leak is easy to spot in /dev/shm.
SEGMENT_PREFIX = "cairn_"


def _buffer(shm: shared_memory.SharedMemory) -> memoryview:
    buf = shm.buf
    if buf is None:  # only after close()
        raise RuntimeError(f"shared memory {shm.name} is closed")
    return buf


class SlotRef(NamedTuple):
    """Picklable description of bytes in a slot: segment name, offset, length."""

    segment: str
    offset: int
    length: int

    def view(self) -> memoryview:
        """A writable memoryview of the described bytes, in any process."""
        shm = _mapped.get(self.segment)
        if shm is None:
            shm = _mapped[self.segment] = shared_memory.SharedMemory(self.segment)
        return _buffer(shm)[self.offset : self.offset + self.length]


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
    """A fixed number of equal slots in one shared-memory segment.

    Create it in the parent before starting work; close it (which unlinks the
    segment) in a ``finally`` — :class:`~cairn.pipeline.engine.Engine` does both.
    """

    def __init__(self, slot_size: int, slot_count: int) -> None:
        if slot_size < 1 or slot_count < 1:
            raise ValueError("slot_size and slot_count must be positive")
        self.slot_size = slot_size
        self.slot_count = slot_count
        name = f"{SEGMENT_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
        self._shm = shared_memory.SharedMemory(name, create=True, size=slot_size * slot_count)
        self.name = self._shm.name.lstrip("/")
        _mapped[self.name] = self._shm
        # Free slot numbers travel through a memory stream: acquire() waits
        # on an empty stream exactly like a stage waits on a full channel.
        self._free_tx, self._free_rx = anyio.create_memory_object_stream[int](slot_count)
        for index in range(slot_count):
            self._free_tx.send_nowait(index)

    @property
    def in_use(self) -> int:
        """Slots currently held."""
        return self.slot_count - self._free_rx.statistics().current_buffer_used

    async def acquire(self) -> Slot:
        """Take a free slot, waiting until one is released if all are in use."""
        return self._slot(await self._free_rx.receive())

    def acquire_nowait(self) -> Slot:
        """Take a free slot or raise ``anyio.WouldBlock``."""
        return self._slot(self._free_rx.receive_nowait())

    def _slot(self, index: int) -> Slot:
        start = index * self.slot_size
        return Slot(self, index, _buffer(self._shm)[start : start + self.slot_size])

    def _free(self, index: int) -> None:
        try:
            self._free_tx.send_nowait(index)
        except anyio.ClosedResourceError:
            pass  # released after close(): nothing left to recycle into

    def close(self) -> None:
        """Unlink and unmap the segment. Idempotent; safe in ``finally``."""
        if _mapped.pop(self.name, None) is None:
            return
        self._free_tx.close()
        self._free_rx.close()
        try:
            self._shm.unlink()  # first: the name must go even if unmapping fails
        except FileNotFoundError:
            pass
        try:
            self._shm.close()
        except BufferError:
            # A caller still holds a view of a slot. Drop our reference to the
            # mapping (it is unmapped when the last view is collected) so that
            # SharedMemory.__del__ does not retry and complain; close the fd.
            self._shm._mmap = None  # type: ignore[attr-defined]
            self._shm.close()


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
