"""The pipeline builder: a source, stages, an optional sink, joined by bounded channels."""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from .errors import StageError
from .metrics import PipelineSnapshot, ProgressCallback, StageMetrics, sizeof_default
from .options import PipelineOptions
from .stages import Clock, CountingReceive, CountingSend, Stage, StageSpec
from .throttle import Throttle
from .workers import WorkerPool

Sizeof = Callable[[Any], int]
Release = Callable[[Any], None]


class Pipeline:
    """A linear chain of stages run concurrently inside one task group.

    Build it with :meth:`source`, then any number of :meth:`map`, :meth:`cpu`
    and :meth:`stage`, then optionally :meth:`sink` (without one, the last
    outputs are dropped); then ``await pipeline.run()``. Each link is a
    memory stream of ``options.channel_capacity`` items, so a slow stage
    holds back everything before it. The first error cancels every stage and
    is raised as :class:`StageError`.
    """

    def __init__(
        self,
        name: str = "pipeline",
        *,
        options: PipelineOptions | None = None,
        on_progress: ProgressCallback | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.name = name
        self.options = options or PipelineOptions()
        self.on_progress = on_progress
        self._clock = clock or anyio.current_time
        self._specs: list[StageSpec] = []
        self._running: list[tuple[StageMetrics, MemoryObjectReceiveStream[Any] | None]] = []
        self._started = 0.0

    def _add(self, spec: StageSpec) -> Pipeline:
        if any(s.name == spec.name for s in self._specs):
            raise ValueError(f"duplicate stage name {spec.name!r}")
        if (spec.kind == "source") != (not self._specs):
            raise ValueError("a pipeline starts with exactly one source")
        if self._specs and self._specs[-1].kind == "sink":
            raise ValueError("nothing can follow the sink")
        if spec.concurrency < 1:
            raise ValueError(f"stage {spec.name!r}: concurrency must be at least 1")
        self._specs.append(spec)
        return self

    def source(
        self,
        name: str,
        items: AsyncIterable[Any] | Iterable[Any],
        *,
        sizeof: Sizeof | None = None,
        hint: str = "",
    ) -> Pipeline:
        """Feed the pipeline from an (async) iterable; an async generator may
        acquire slots, so reading ahead is bounded like any other stage.
        ``hint`` as in :meth:`map`."""
        spec = StageSpec(name, "source", items, sizeof=sizeof or sizeof_default, hint=hint)
        return self._add(spec)

    def map(
        self,
        name: str,
        fn: Callable[[Any], Awaitable[Any]] | Callable[[Any], AsyncIterable[Any]],
        *,
        concurrency: int = 1,
        ordered: bool = False,
        sizeof: Sizeof | None = None,
        throttle: Throttle | None = None,
        release: Release | None = None,
        hint: str = "",
        throttle_hint: str = "",
    ) -> Pipeline:
        """An async stage: ``await fn(item)`` gives one output; an async
        generator ``fn`` gives zero or more. ``concurrency`` tasks run it;
        ``ordered`` keeps outputs in input order. With ``throttle``, each item
        first waits for ``sizeof(item)`` bytes of the shared token bucket.

        ``release(item)`` runs once the stage is done with an input item —
        after ``fn`` returns or raises, before its output is sent on — so an
        item that owns a resource (a shared-memory slot) gives it back in the
        stage that finishes with it, however that ends.

        ``hint`` names what to tune when this stage limits the run (a flag, for
        the end-of-run bottleneck line); ``throttle_hint`` when a throttle held
        it most of the time (see :func:`~cairn.pipeline.metrics.bottleneck`)."""
        spec = StageSpec(
            name,
            "map",
            fn,
            concurrency,
            ordered,
            sizeof or sizeof_default,
            throttle,
            release,
            hint,
            throttle_hint,
        )
        return self._add(spec)

    def cpu(
        self,
        name: str,
        fn: Callable[..., Any],
        pool: WorkerPool,
        *,
        args: Callable[[Any], tuple[Any, ...]] | None = None,
        concurrency: int | None = None,
        ordered: bool = True,
        sizeof: Sizeof | None = None,
        release: Release | None = None,
        hint: str = "",
    ) -> Pipeline:
        """A CPU stage: ``fn(*args(item))`` runs in ``pool`` (default args:
        ``(item,)``). Default: two jobs per worker, so a worker has its next
        job queued even when the parent is slow to hand results on (1, 2 and
        3 per worker measured alike in bench/engine.py). ``release`` as in
        :meth:`map`: e.g. free the slot the job read from once it is done;
        ``hint`` as in :meth:`map` (typically the worker-count flag)."""
        to_args = args or (lambda item: (item,))

        async def call(item: Any) -> Any:
            return await pool.run(fn, *to_args(item))

        width = concurrency or 2 * pool.workers
        return self.map(
            name,
            call,
            concurrency=width,
            ordered=ordered,
            sizeof=sizeof,
            release=release,
            hint=hint,
        )

    def stage(
        self, name: str, fn: Callable[[Any, Any], Awaitable[None]], *, hint: str = ""
    ) -> Pipeline:
        """A raw stage ``await fn(receive, send)`` for stateful work (e.g. packing
        blobs until a pack is full); the engine closes both streams after it.
        ``hint`` as in :meth:`map`."""
        return self._add(StageSpec(name, "raw", fn, hint=hint))

    def sink(
        self,
        name: str,
        fn: Callable[[Any], Awaitable[None]],
        *,
        concurrency: int = 1,
        sizeof: Sizeof | None = None,
        throttle: Throttle | None = None,
        release: Release | None = None,
        hint: str = "",
        throttle_hint: str = "",
    ) -> Pipeline:
        """The consumer: ``await fn(item)`` for each final item. With
        ``concurrency`` 1 it sees items in the order they arrive. ``release``,
        ``hint`` and ``throttle_hint`` as in :meth:`map`."""
        spec = StageSpec(
            name,
            "sink",
            fn,
            concurrency,
            False,
            sizeof or sizeof_default,
            throttle,
            release,
            hint,
            throttle_hint,
        )
        return self._add(spec)

    def snapshot(self, done: bool = False) -> PipelineSnapshot:
        """Counters of every stage now (valid during and after :meth:`run`)."""
        stages = []
        for metrics, rx in self._running:
            depth = capacity = 0
            if rx is not None:
                stats = rx.statistics()
                depth, capacity = stats.current_buffer_used, int(stats.max_buffer_size)
            stages.append(metrics.snapshot(depth, capacity))
        elapsed = self._clock() - self._started if self._running else 0.0
        return PipelineSnapshot(self.name, elapsed, tuple(stages), done)

    async def run(self) -> PipelineSnapshot:
        """Run to completion; return the final snapshot or raise the first error."""
        if not self._specs:
            raise ValueError("a pipeline needs a source")
        self._started = self._clock()
        try:
            async with anyio.create_task_group() as outer:
                if self.on_progress is not None:
                    outer.start_soon(self._report, self.on_progress)
                async with anyio.create_task_group() as tg:
                    self._start_stages(tg)
                outer.cancel_scope.cancel()  # stops the reporter
        except BaseExceptionGroup as group:
            error = _first_error(group)
            raise error from error.__cause__  # keep the stage's original cause
        finally:
            final = self.snapshot(done=True)
            if self.on_progress is not None:
                self.on_progress(final)
        return final

    def _start_stages(self, tg: anyio.abc.TaskGroup) -> None:
        capacity = self.options.channel_capacity
        source, *rest = self._specs
        if rest and rest[-1].kind == "sink":
            *middle, last = rest
        else:
            middle, last = rest, StageSpec("discard", "sink", _discard)
        self._running = []
        rx = self._start_source(tg, source, capacity)
        for spec in middle:
            metrics = _metrics(spec)
            self._running.append((metrics, rx))
            tx, next_rx = anyio.create_memory_object_stream[Any](capacity)
            if spec.kind == "raw":
                tg.start_soon(_run_raw, spec, metrics, rx, tx, name=spec.name)
            else:
                stage = Stage(spec, metrics, self._clock)
                tg.start_soon(stage.run_map, rx, tx, capacity, name=spec.name)
            rx = next_rx
        metrics = _metrics(last)
        self._running.append((metrics, rx))
        tg.start_soon(Stage(last, metrics, self._clock).run_map, rx, None, capacity)

    def _start_source(
        self, tg: anyio.abc.TaskGroup, spec: StageSpec, capacity: int
    ) -> MemoryObjectReceiveStream[Any]:
        metrics = StageMetrics(spec.name, 1, spec.hint)
        self._running.append((metrics, None))
        tx, rx = anyio.create_memory_object_stream[Any](capacity)
        tg.start_soon(Stage(spec, metrics, self._clock).run_source, tx, name=spec.name)
        return rx

    async def _report(self, callback: ProgressCallback) -> None:
        while True:
            await anyio.sleep(self.options.progress_interval)
            try:
                callback(self.snapshot())
            except Exception as exc:
                raise StageError("progress", None, exc) from exc


def _metrics(spec: StageSpec) -> StageMetrics:
    return StageMetrics(spec.name, spec.concurrency, spec.hint, spec.throttle_hint)


async def _run_raw(spec: StageSpec, metrics: StageMetrics, rx: Any, tx: Any) -> None:
    async with rx, tx:
        try:
            await spec.fn(CountingReceive(rx, metrics), CountingSend(tx, metrics))
        except Exception as exc:
            raise StageError(spec.name, None, exc) from exc


async def _discard(item: Any) -> None:
    pass


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to raise: an interrupt first, then the first StageError."""
    leaves = _leaves(group)
    for exc in leaves:
        if not isinstance(exc, Exception):
            return exc  # KeyboardInterrupt, SystemExit
    for exc in leaves:
        if isinstance(exc, StageError):
            return exc
    return leaves[0]
