"""One run's resources: the worker pool and shared-memory slot pools, cleaned up together."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from .metrics import ProgressCallback
from .options import PipelineOptions
from .pipeline import Pipeline
from .shm import SlotPool
from .workers import WorkerPool


class Engine:
    """Workers and slots for one run; get one from :func:`open_engine`."""

    def __init__(self, options: PipelineOptions, pool: WorkerPool) -> None:
        self.options = options
        #: The process pool CPU stages run in.
        self.pool = pool
        self._slot_pools: list[SlotPool] = []
        #: The default slot pool: ``options.slots`` slots of ``options.slot_size``.
        self.slots = self.slot_pool()

    def slot_pool(self, slot_size: int | None = None, slot_count: int | None = None) -> SlotPool:
        """Another slot pool, unlinked when the engine closes.

        Use a separate pool when a task holding one slot waits for another
        (input piece -> output blobs): sharing one pool could deadlock once
        every slot is held by a task waiting for a second one.
        """
        pool = SlotPool(slot_size or self.options.slot_size, slot_count or self.options.slots)
        self._slot_pools.append(pool)
        return pool

    def pipeline(self, name: str, *, on_progress: ProgressCallback | None = None) -> Pipeline:
        """A new pipeline using this engine's options."""
        return Pipeline(name, options=self.options, on_progress=on_progress)

    def close_slots(self) -> None:
        """Unlink every slot pool (idempotent)."""
        for pool in self._slot_pools:
            pool.close()


@asynccontextmanager
async def open_engine(
    options: PipelineOptions | None = None,
    *,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
) -> AsyncIterator[Engine]:
    """Start ``options.cpu_workers`` workers and the default slot pool.

    On exit — normal, error, cancellation or Ctrl-C — workers are stopped
    (killed after a grace period) and every shared-memory segment unlinked.
    """
    options = options or PipelineOptions()
    pool = WorkerPool(
        options.cpu_workers,
        start_method=options.start_method,
        initializer=initializer,
        initargs=initargs,
    )
    async with pool:
        engine = Engine(options, pool)
        try:
            yield engine
        finally:
            engine.close_slots()
