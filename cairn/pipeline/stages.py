"""How one stage runs: N tasks between an input and an output channel.

A stage receives from one memory stream and sends to the next, closes its
send side when done (so the next stage sees end-of-input), and wraps any
error from the user's function in :class:`StageError` with the item.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .errors import StageError
from .metrics import StageMetrics, waits
from .throttle import Throttle

Clock = Callable[[], float]
Emit = Callable[[Any], Awaitable[None]]
#: A source that sends its items itself: ``await produce(send)``.
Producer = Callable[[ObjectSendStream[Any]], Awaitable[None]]


@dataclass(frozen=True)
class StageSpec:
    """What the pipeline builder records about one stage."""

    name: str
    kind: str  # "source", "map", "sink" or "raw"
    fn: Any
    concurrency: int = 1
    ordered: bool = False
    sizeof: Callable[[Any], int] | None = None
    throttle: Throttle | None = None
    # Called with each input item once the stage is done with it (also when the
    # stage's function fails): hands back what the item owns, e.g. a shm slot.
    release: Callable[[Any], None] | None = None
    # What to tune when this stage limits the run, and when its throttle does.
    hint: str = ""
    throttle_hint: str = ""
    # Items the stage's input channel holds (None: the pipeline's channel_capacity).
    capacity: int | None = None


class Stage:
    """A running stage: its spec, counters and clock."""

    def __init__(self, spec: StageSpec, metrics: StageMetrics, clock: Clock) -> None:
        self.spec = spec
        self.metrics = metrics
        self.clock = clock
        self.is_generator = inspect.isasyncgenfunction(spec.fn)

    async def run_source(self, tx: ObjectSendStream[Any]) -> None:
        """Send every item of the source iterable, then close ``tx``."""
        items: AsyncIterable[Any] | Iterable[Any] | Producer = self.spec.fn
        async with tx:
            if not isinstance(items, AsyncIterable | Iterable):
                await self._run_producer(items, tx)
            elif isinstance(items, AsyncIterable):
                iterator = aiter(items)
                while True:
                    start = self.clock()
                    try:
                        item = await anext(iterator)
                    except StopAsyncIteration:
                        break
                    except Exception as exc:
                        raise StageError(self.spec.name, None, exc) from exc
                    finally:
                        self.metrics.busy_seconds += self.clock() - start
                    await self._send(tx, item)
            else:
                for item in items:
                    await self._send(tx, item)

    async def _run_producer(self, produce: Producer, tx: ObjectSendStream[Any]) -> None:
        # A producer sends its items itself (it may run tasks of its own): its
        # busy time is what it spent not waiting to send.
        send = _SourceSend(tx, self)
        start = self.clock()
        try:
            await produce(send)
        except Exception as exc:
            raise StageError(self.spec.name, None, exc) from exc
        finally:
            # Several tasks of the producer may wait at once: never below zero.
            elapsed = self.clock() - start
            self.metrics.busy_seconds += max(0.0, elapsed - send.waited)

    async def _send(self, tx: ObjectSendStream[Any], item: Any) -> None:
        # A source's input is its iterable: what it takes from it, it sends on.
        self.metrics.items_in += 1
        self.metrics.items_out += 1
        self.metrics.bytes_in += self._size(item)
        start = self.clock()
        await tx.send(item)
        self.metrics.wait_out_seconds += self.clock() - start

    def _size(self, item: Any) -> int:
        sizeof = self.spec.sizeof
        return sizeof(item) if sizeof is not None else 0

    async def run_map(
        self,
        rx: MemoryObjectReceiveStream[Any],
        tx: MemoryObjectSendStream[Any] | None,
        capacity: int,
    ) -> None:
        """Run ``concurrency`` tasks over ``rx``; keep input order if ``ordered``."""
        if self.spec.ordered and self.spec.concurrency > 1 and tx is not None:
            await self._run_ordered(rx, tx, capacity)
            return
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self.spec.concurrency):
                    tg.start_soon(self._unordered_task, rx.clone(), tx.clone() if tx else None)
        finally:
            # Each task closed its clones; these close the originals, so the
            # next stage sees end-of-input once every task is done.
            rx.close()
            if tx is not None:
                tx.close()

    async def _unordered_task(
        self, rx: ObjectReceiveStream[Any], tx: ObjectSendStream[Any] | None
    ) -> None:
        emit = self._emitter(tx)
        async with rx:
            while True:
                start = self.clock()
                try:
                    item = await rx.receive()
                except anyio.EndOfStream:
                    break
                finally:
                    self.metrics.wait_in_seconds += self.clock() - start
                await self.process(item, emit)
        if tx is not None:
            await tx.aclose()

    def _emitter(self, tx: ObjectSendStream[Any] | None) -> Emit:
        metrics, clock = self.metrics, self.clock

        async def emit(out: Any) -> None:
            metrics.items_out += 1
            if tx is not None:
                start = clock()
                await tx.send(out)
                metrics.wait_out_seconds += clock() - start

        return emit

    async def _run_ordered(
        self,
        rx: MemoryObjectReceiveStream[Any],
        tx: MemoryObjectSendStream[Any],
        capacity: int,
    ) -> None:
        # One dispatcher numbers items by giving each a private sub-channel,
        # queued in input order; workers fill sub-channels concurrently and
        # one collector drains them in order. The order queue holds 2 x
        # concurrency items so a slow head item does not idle the other tasks
        # at once; each sub-channel holds `capacity` outputs.
        n = self.spec.concurrency
        order_tx, order_rx = anyio.create_memory_object_stream[ObjectReceiveStream[Any]](2 * n)
        work_tx, work_rx = anyio.create_memory_object_stream[tuple[Any, Any]](0)
        # A plain function emits one output: 1 slot lets its task move on.
        capacity = max(1, capacity) if self.is_generator else 1
        clock, metrics = self.clock, self.metrics
        # A worker waiting for work waits on output while the dispatcher is stuck
        # on a full order queue (the collector cannot hand on), else on input:
        # `held` totals the dispatcher's time stuck, `since` marks a stretch in
        # progress, so a worker's wait splits exactly between the two.
        held, since = 0.0, None

        def held_now() -> float:
            return held + (clock() - since if since is not None else 0.0)

        async def dispatch() -> None:
            nonlocal held, since
            async with rx, order_tx, work_tx:
                async for item in rx:
                    sub_tx, sub_rx = anyio.create_memory_object_stream[Any](capacity)
                    since = clock()
                    try:
                        await order_tx.send(sub_rx)
                    finally:
                        held, since = held_now(), None
                    await work_tx.send((item, sub_tx))

        async def work(work_rx: ObjectReceiveStream[tuple[Any, Any]]) -> None:
            async with work_rx:
                while True:
                    start, held_start = clock(), held_now()
                    try:
                        item, sub_tx = await work_rx.receive()
                    except anyio.EndOfStream:
                        break
                    finally:
                        on_output = held_now() - held_start
                        metrics.wait_out_seconds += on_output
                        metrics.wait_in_seconds += clock() - start - on_output
                    async with sub_tx:
                        await self.process(item, self._emitter(sub_tx))

        async def collect() -> None:
            async with order_rx, tx:
                async for sub_rx in order_rx:
                    async with sub_rx:
                        async for out in sub_rx:
                            await tx.send(out)

        async with anyio.create_task_group() as tg:
            tg.start_soon(dispatch)
            tg.start_soon(collect)
            for _ in range(n):
                tg.start_soon(work, work_rx.clone())
            work_rx.close()

    async def process(self, item: Any, emit: Emit) -> None:
        """Apply the stage function to one item and emit its output(s)."""
        spec, metrics = self.spec, self.metrics
        metrics.items_in += 1
        size = self._size(item)
        metrics.bytes_in += size
        if self.is_generator:
            try:
                if spec.throttle is not None and size:
                    start = self.clock()
                    await spec.throttle.acquire(size)
                    metrics.throttled_seconds += self.clock() - start
                await self._process_generator(item, emit)
            finally:
                self._release(item)
            return
        start = self.clock()
        # Time the function spends held by a throttle or on a resource only a later
        # stage frees is noted in `waited` and is not busy time.
        with waits() as waited:
            try:
                if spec.throttle is not None and size:
                    await spec.throttle.acquire(size)
                out = await spec.fn(item)
            except Exception as exc:
                raise StageError(spec.name, item, exc) from exc
            finally:
                metrics.busy_seconds += self.clock() - start - waited.output - waited.throttled
                metrics.wait_out_seconds += waited.output
                metrics.throttled_seconds += waited.throttled
                # Before the output is sent on: a full channel downstream must not
                # keep this item's slot from the stages upstream.
                self._release(item)
        if spec.kind != "sink":
            await emit(out)

    def _release(self, item: Any) -> None:
        if self.spec.release is not None:
            self.spec.release(item)

    async def _process_generator(self, item: Any, emit: Emit) -> None:
        agen = self.spec.fn(item)
        metrics = self.metrics
        try:
            while True:
                start = self.clock()
                with waits() as waited:
                    try:
                        out = await anext(agen)
                    except StopAsyncIteration:
                        return
                    except Exception as exc:
                        raise StageError(self.spec.name, item, exc) from exc
                    finally:
                        elapsed = self.clock() - start
                        metrics.busy_seconds += elapsed - waited.output - waited.throttled
                        metrics.wait_out_seconds += waited.output
                        metrics.throttled_seconds += waited.throttled
                await emit(out)  # waiting on downstream is not busy time
        finally:
            await agen.aclose()


class CountingReceive(ObjectReceiveStream[Any]):
    """Input of a raw stage: counts what the stage's function receives."""

    def __init__(self, inner: ObjectReceiveStream[Any], metrics: StageMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    async def receive(self) -> Any:
        start = anyio.current_time()
        try:
            item = await self._inner.receive()
        finally:
            self._metrics.wait_in_seconds += anyio.current_time() - start
        self._metrics.items_in += 1
        return item

    async def aclose(self) -> None:
        await self._inner.aclose()


class CountingSend(ObjectSendStream[Any]):
    """Output of a raw stage: counts what the stage's function sends."""

    def __init__(self, inner: ObjectSendStream[Any], metrics: StageMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    async def send(self, item: Any) -> None:
        self._metrics.items_out += 1
        start = anyio.current_time()
        await self._inner.send(item)
        self._metrics.wait_out_seconds += anyio.current_time() - start

    async def aclose(self) -> None:
        await self._inner.aclose()


class _SourceSend(ObjectSendStream[Any]):
    """What a producer sends through: counts its items and its waits on output."""

    def __init__(self, inner: ObjectSendStream[Any], stage: Stage) -> None:
        self._inner = inner
        self._stage = stage
        self.waited = 0.0

    async def send(self, item: Any) -> None:
        before = self._stage.metrics.wait_out_seconds
        await self._stage._send(self._inner, item)
        self.waited += self._stage.metrics.wait_out_seconds - before

    async def aclose(self) -> None:
        await self._inner.aclose()
