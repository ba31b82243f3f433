"""Concurrency settings for one pipeline run, in one frozen object."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

MiB = 1024 * 1024


#: restic's default for remote backends; the one number every run starts from when
#: neither a flag nor the backend says otherwise (the CLI uses the backend's own).
DEFAULT_CONNECTIONS = 5
#: Files read at once (restic uses 2 too).
DEFAULT_READ_CONCURRENCY = 2


def cores() -> int:
    """CPU cores this process may run on: the default number of workers."""
    return _cores()


def _cores() -> int:
    # sched_getaffinity honours taskset/cgroup pinning; cpu_count() does not.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class PipelineOptions:
    """How wide each part of the engine runs and how much memory it may hold.

    Memory in flight is bounded by ``slot_size * slot_count`` (shared memory)
    plus ``channel_capacity`` items per channel, whatever the input size.
    """

    # One worker process per core: CPU stages (hash, compress, encrypt) release
    # the GIL but a worker still burns one core; more workers than cores only
    # adds context switches (bench/ENGINE.md: workers=2 on 2 cores ~1.9x).
    cpu_workers: int = field(default_factory=_cores)
    # Files read at once. 2 keeps a local disk busy while one file waits on
    # open()/stat(); higher helps network filesystems (restic uses 2 too).
    read_concurrency: int = DEFAULT_READ_CONCURRENCY
    # Backend connections (uploads/downloads in flight); restic's default is 5.
    connections: int = DEFAULT_CONNECTIONS
    # Items buffered between two stages. Small on purpose: the backpressure
    # bound is capacity x item size. 4 lets a producer run a few items ahead
    # to absorb jitter; bulk bytes wait in slots, not in channels, anyway.
    channel_capacity: int = 4
    # Shared-memory slot size: one file piece. 8 MiB = pyfastcdc's max chunk,
    # so a chunk never needs more than two pieces; 1, 8 and 16 MiB pieces
    # measured within 3% of each other in bench/engine.py.
    slot_size: int = 8 * MiB
    # Slots per slot pool. 0 means automatic: 2 per worker (one being worked
    # on, one queued so a worker never waits for the reader) + 1 per reader;
    # workers=2 reached its full rate with this many in bench/engine.py.
    slot_count: int = 0
    # 'forkserver': fork() is unsafe once the event loop has threads. Ready
    # workers in ~70 ms for 2 (~100 ms for the first pool, which starts the
    # server) versus ~90 ms for 'spawn' (bench/ENGINE.md).
    start_method: str = "forkserver"
    # Seconds between progress snapshots: 1 Hz is what a progress bar or a
    # JSON status line needs, and costs nothing measurable.
    progress_interval: float = 1.0

    def __post_init__(self) -> None:
        for name in ("cpu_workers", "read_concurrency", "connections", "slot_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.channel_capacity < 0 or self.slot_count < 0:
            raise ValueError("channel_capacity and slot_count must not be negative")
        if self.progress_interval <= 0:
            raise ValueError("progress_interval must be positive")

    @property
    def slots(self) -> int:
        """The number of shared-memory slots to allocate (resolves ``slot_count=0``)."""
        if self.slot_count:
            return self.slot_count
        return 2 * self.cpu_workers + self.read_concurrency
