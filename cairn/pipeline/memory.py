"""Counting the bytes a run holds outside its fixed buffers.

Slot pools are allocated once and never grow; everything else a run keeps in
memory — blob copies, packs waiting for or on their way to the backend — is
counted by a :class:`HeldBytes` at the places the copies are made and dropped.
Its ``peak`` is what a test asserts against a documented bound: an explicit
account, unlike RSS or tracemalloc, which the allocator and other code blur.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager


class HeldBytes:
    """Bytes currently held and the most ever held at once (single event loop)."""

    __slots__ = ("current", "peak")

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def add(self, nbytes: int) -> None:
        """Count ``nbytes`` more as held."""
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current

    def sub(self, nbytes: int) -> None:
        """Count ``nbytes`` as no longer held."""
        self.current -= nbytes

    @contextmanager
    def holding(self, nbytes: int) -> Iterator[None]:
        """Count ``nbytes`` as held for the duration of a ``with`` block."""
        self.add(nbytes)
        try:
            yield
        finally:
            self.sub(nbytes)


def trim_heap() -> None:
    """Hand the allocator's free memory back to the system (glibc ``malloc_trim``).

    cli/memory.py lets freed buffers of up to 64 MiB stay on the heap, which is
    right while they are reused; after a phase that will not come back (a backup's
    first blobs encoded in threads before its workers start), they would stay for
    the rest of the run."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
