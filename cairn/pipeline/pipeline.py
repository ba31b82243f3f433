"""The pipeline builder: a source, stages, an optional sink, joined by bounded channels."""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .errors import StageError
from .metrics import (
    PipelineSnapshot,
    ProgressCallback,
    StageMetrics,
    sizeof_default,
    waiting_on_output,
    waits,
)
from .options import PipelineOptions
from .stages import Clock, CountingReceive, CountingSend, Producer, Stage, StageSpec
from .throttle import Throttle
from .workers import WorkerPool

Sizeof = Callable[[Any], int]
Release = Callable[[Any], None]


class Pipeline:
    """A linear chain of stages run concurrently inside one task group.

    Build it with :meth:`source`, then any number of :meth:`map`, :meth:`cpu`
    and :meth:`stage`, then optionally :meth:`sink` (without one, the last
    outputs are dropped); then ``await pipeline.run()``. Each link is a
    memory stream of ``options.channel_capacity`` items (or the ``capacity``
    given to the stage it feeds), so a slow stage holds back everything before
    it. :meth:`inlet` feeds a stage from outside the chain (a fan-in). The
    first error cancels every stage and is raised as :class:`StageError`.
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
        self._inlets: list[Inlet] = []
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
        items: AsyncIterable[Any] | Iterable[Any] | Producer,
        *,
        sizeof: Sizeof | None = None,
        hint: str = "",
    ) -> Pipeline:
        """Feed the pipeline from an (async) iterable; an async generator may
        acquire slots, so reading ahead is bounded like any other stage. Or from
        a producer, ``await items(send)``, which sends items itself — e.g. from
        tasks of its own, as a walker scanning several directories at once.
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
        capacity: int | None = None,
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
        it most of the time (see :func:`~cairn.pipeline.metrics.bottleneck`).

        ``capacity`` is the size of this stage's input channel (default:
        ``options.channel_capacity``); 0 hands each item over directly, so
        nothing bulky waits in the link."""
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
            capacity,
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
        capacity: int | None = None,
    ) -> Pipeline:
        """A CPU stage: ``fn(*args(item))`` runs in ``pool`` (default args:
        ``(item,)``). Default: two jobs per worker, so a worker has its next
        job queued even when the parent is slow to hand results on (1, 2 and
        3 per worker measured alike in bench/engine.py). ``release`` as in
        :meth:`map`: e.g. free the slot the job read from once it is done;
        ``hint`` (typically the worker-count flag) and ``capacity`` as in :meth:`map`."""
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
            capacity=capacity,
        )

    def stage(
        self,
        name: str,
        fn: Callable[[Any, Any], Awaitable[None]],
        *,
        hint: str = "",
        throttle_hint: str = "",
        capacity: int | None = None,
    ) -> Pipeline:
        """A raw stage ``await fn(receive, send)`` for stateful work (e.g. packing
        blobs until a pack is full); the engine closes both streams after it.
        Its busy time is what it spent not waiting on either stream, a throttle
        or inside ``waiting_on_output()``. ``hint``, ``throttle_hint`` and
        ``capacity`` as in :meth:`map`."""
        spec = StageSpec(name, "raw", fn, hint=hint, throttle_hint=throttle_hint, capacity=capacity)
        return self._add(spec)

    def inlet(self, stage: str, *, until: str) -> Inlet:
        """A fan-in: a handle that feeds items into ``stage``'s input from outside
        the chain (e.g. from inside another stage's function), beside what its
        upstream stage sends. The engine closes it once stage ``until`` has
        finished, so ``stage`` sees end-of-input only after both its upstream
        and every sender of the inlet are done: whoever sends must be ``until``
        or run before it ends. Sending waits while the input channel is full;
        inside a stage's function that counts as waiting on output."""
        inlet = Inlet(stage, until)
        self._inlets.append(inlet)
        return inlet

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
        capacity: int | None = None,
    ) -> Pipeline:
        """The consumer: ``await fn(item)`` for each final item. With
        ``concurrency`` 1 it sees items in the order they arrive. ``release``,
        ``hint``, ``throttle_hint`` and ``capacity`` as in :meth:`map`."""
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
            capacity,
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
        self._check_inlets()
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

    def _check_inlets(self) -> None:
        names = {spec.name for spec in self._specs}
        for inlet in self._inlets:
            if inlet.stage not in names or inlet.stage == self._specs[0].name:
                raise ValueError(f"inlet: no stage {inlet.stage!r} after the source")
            if inlet.until not in names:
                raise ValueError(f"inlet: no stage {inlet.until!r} to wait for")

    def _start_stages(self, tg: anyio.abc.TaskGroup) -> None:
        default = self.options.channel_capacity
        source, *rest = self._specs
        if rest and rest[-1].kind == "sink":
            *middle, last = rest
        else:
            middle, last = rest, StageSpec("discard", "sink", _discard)
        self._running = []
        # Stage name -> the inlet streams to close once that stage has finished.
        closing: dict[str, list[MemoryObjectSendStream[Any]]] = {}

        def link(spec: StageSpec) -> tuple[MemoryObjectSendStream[Any], Any]:
            capacity = default if spec.capacity is None else spec.capacity
            tx, rx = anyio.create_memory_object_stream[Any](capacity)
            for inlet in self._inlets:
                if inlet.stage == spec.name:
                    inlet._tx = tx.clone()
                    closing.setdefault(inlet.until, []).append(inlet._tx)
            return tx, rx

        def start(spec: StageSpec, run: Callable[..., Awaitable[None]], *args: Any) -> None:
            # Started now, run later: `closing` is complete by the time it ends.
            tg.start_soon(_then_close, run, args, closing, spec.name, name=spec.name)

        chain = [*middle, last]
        metrics = StageMetrics(source.name, 1, source.hint)
        self._running.append((metrics, None))
        tx, rx = link(chain[0])
        start(source, Stage(source, metrics, self._clock).run_source, tx)
        for spec, after in zip(middle, chain[1:], strict=True):
            metrics = _metrics(spec)
            self._running.append((metrics, rx))
            tx, next_rx = link(after)
            if spec.kind == "raw":
                start(spec, _run_raw, spec, metrics, rx, tx)
            else:
                start(spec, Stage(spec, metrics, self._clock).run_map, rx, tx, default)
            rx = next_rx
        metrics = _metrics(last)
        self._running.append((metrics, rx))
        start(last, Stage(last, metrics, self._clock).run_map, rx, None, default)

    async def _report(self, callback: ProgressCallback) -> None:
        while True:
            await anyio.sleep(self.options.progress_interval)
            try:
                callback(self.snapshot())
            except Exception as exc:
                raise StageError("progress", None, exc) from exc


class Inlet:
    """A send handle into a stage's input from outside the chain (see
    :meth:`Pipeline.inlet`); usable while the pipeline runs."""

    def __init__(self, stage: str, until: str) -> None:
        self.stage = stage
        self.until = until
        self._tx: MemoryObjectSendStream[Any] | None = None

    async def send(self, item: Any) -> None:
        """Put ``item`` into the stage's input; waits while the channel is full."""
        if self._tx is None:
            raise RuntimeError(f"inlet into {self.stage!r}: the pipeline is not running")
        with waiting_on_output():
            await self._tx.send(item)


async def _then_close(
    run: Callable[..., Awaitable[None]],
    args: tuple[Any, ...],
    closing: dict[str, list[MemoryObjectSendStream[Any]]],
    name: str,
) -> None:
    try:
        await run(*args)
    finally:
        for tx in closing.get(name, []):
            tx.close()


def _metrics(spec: StageSpec) -> StageMetrics:
    return StageMetrics(spec.name, spec.concurrency, spec.hint, spec.throttle_hint)


async def _run_raw(spec: StageSpec, metrics: StageMetrics, rx: Any, tx: Any) -> None:
    # One task: its busy time is what it spent not waiting on either side.
    start = anyio.current_time()
    waited = metrics.wait_in_seconds + metrics.wait_out_seconds
    async with rx, tx:
        with waits() as noted:
            try:
                await spec.fn(CountingReceive(rx, metrics), CountingSend(tx, metrics))
            except Exception as exc:
                raise StageError(spec.name, None, exc) from exc
            finally:
                metrics.wait_out_seconds += noted.output
                metrics.throttled_seconds += noted.throttled
                waited = metrics.wait_in_seconds + metrics.wait_out_seconds - waited
                elapsed = anyio.current_time() - start
                metrics.busy_seconds += max(0.0, elapsed - waited - noted.throttled)


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
