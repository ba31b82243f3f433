"""The process pool: CPU stages run here, started once per run.

Each worker is a process joined to the parent by a socket pair. A job is one
pickled ``(function, args)`` message and one pickled result back; bulk bytes
go through shared-memory slots (:mod:`cairn.pipeline.shm`), so messages stay
small. Log events a job emits travel back with its reply and are re-emitted
by the parent (:mod:`cairn.pipeline.worklog`). The parent waits for a reply
with ``anyio.wait_readable`` on the socket: no helper thread per call, and it
works on asyncio and trio alike
(bench/ENGINE.md compares it with ``to_thread`` + ``concurrent.futures``).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
import traceback
from collections.abc import Callable, Sequence
from multiprocessing import reduction
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

import anyio

from . import shm, worklog
from .errors import RemoteError, WorkerCrashed
from .shm import SlotRef

R = TypeVar("R")

# Seconds a worker gets to exit after its socket is closed before it is killed.
_STOP_GRACE = 2.0
# Starts a message handing slot memory to a worker (a job is a pickle: b"\x80...").
_ATTACH = b"attach:"
# glibc serves allocations from this size up with their own mmap, returned to the
# system on free. Its default threshold rises after the first large free, so a
# worker's heap would keep each job's largest buffers (8 MiB chunks, compressed
# and decoded) for the rest of the run: ~17 MiB per worker, measured. 4 MiB keeps
# the common 1 MiB chunks on the heap (256 KiB cost 30-50% more CPU in page faults).
_MMAP_THRESHOLD = 4 * 1024 * 1024


def _worker_main(
    conn: Connection,
    initializer: Callable[..., Any] | None,
    initargs: tuple,
    log_level: int = worklog.DEFAULT_LEVEL,
) -> None:
    # Ctrl-C reaches the whole foreground process group, and SIGTERM often does
    # too (systemd, ``kill -- -PGID``); the parent decides how to stop, so a worker
    # must not die of either: it exits when its socket closes, or is killed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Log events ride back to the parent with each reply (see worklog.py).
    worklog.capture(log_level)
    _fix_mmap_threshold()
    started = True
    try:
        if initializer is not None:
            initializer(*initargs)
    except BaseException as exc:
        started, ready = False, _dump_result(False, exc)
    else:
        ready = _dump_result(True, os.getpid())
    try:
        conn.send_bytes(ready)
    except OSError:
        # The parent stopped (an interrupt) while this worker was starting, which
        # a pool growing during the run makes likely: nobody waits for it.
        return
    if not started:
        return
    while True:
        try:
            message = conn.recv_bytes()
            if message.startswith(_ATTACH):
                # Slot memory handed over before the job that uses it (no reply).
                shm.adopt(message[len(_ATTACH) :].decode(), reduction.recv_handle(conn))
                continue
        except (EOFError, OSError):
            return  # parent closed our socket (normal stop) or died
        reply = _run_job(message)
        try:
            conn.send_bytes(reply)
        except OSError:
            # The parent stopped (an interrupt) while the job ran: nobody wants
            # the reply, and a traceback here would only clutter the terminal.
            return


def _fix_mmap_threshold() -> None:
    """Big buffers go back to the system when freed (glibc's ``M_MMAP_THRESHOLD``)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; a fixed value stays
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _run_job(message: bytes) -> bytes:
    views: list[memoryview] = []
    try:
        fn, args = pickle.loads(message)
        # Top-level SlotRef arguments arrive as memoryviews of the slot.
        call_args = []
        for arg in args:
            if isinstance(arg, SlotRef):
                arg = arg.view()
                views.append(arg)
            call_args.append(arg)
        return _dump_result(True, fn(*call_args))
    except BaseException as exc:
        return _dump_result(False, exc)
    finally:
        for view in views:
            try:
                view.release()
            except BufferError:
                pass  # the function kept a slice; it dies with the job's garbage


def _dump_result(ok: bool, value: Any) -> bytes:
    if not ok:
        # Tracebacks do not pickle; notes do, so the parent can show where.
        value.add_note("in worker:\n" + "".join(traceback.format_exception(value)))
    records = worklog.drain()
    try:
        data = pickle.dumps((ok, value, records), pickle.HIGHEST_PROTOCOL)
        if not ok:
            # An exception can pickle and still fail to rebuild (an ``__init__`` that
            # wants other arguments than ``args``); errors are rare, so check here,
            # where the text is still at hand.
            pickle.loads(data)
        return data
    except Exception as exc:
        if ok:
            error = RemoteError(f"unpicklable result: {value!r} ({exc})")
        else:
            error = RemoteError(
                f"{type(value).__name__}: {value} (could not be sent back from the worker: {exc})"
            )
        return pickle.dumps((False, error, records), pickle.HIGHEST_PROTOCOL)


class _Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.reaped = False
        self.attached: set[str] = set()  # slot memory handed over already

    def hand_over(self, refs: list[SlotRef]) -> None:
        """Send the descriptors of slot memory this worker has not mapped yet."""
        for segment in {ref.segment for ref in refs} - self.attached:
            fd = shm.owned_fd(segment)
            if fd is None:
                continue  # not ours to give: the worker maps it through /proc
            self.conn.send_bytes(_ATTACH + segment.encode())
            reduction.send_handle(self.conn, fd, self.process.pid)
            self.attached.add(segment)

    @property
    def alive(self) -> bool:
        return not self.conn.closed

    async def receive(self) -> tuple[bool, Any]:
        await anyio.wait_readable(self.conn.fileno())
        try:
            data = self.conn.recv_bytes()
        except (EOFError, OSError):
            raise WorkerCrashed(
                f"worker process {self.process.pid} died (exit code {self._exitcode()})"
            ) from None
        try:
            ok, value, records = pickle.loads(data)
        except Exception as exc:
            # The worker checks its errors before sending; this is the last resort.
            raise RemoteError(
                f"the reply of worker process {self.process.pid} could not be read: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if records:
            worklog.replay(records, self.process.pid)
        return ok, value

    def _exitcode(self) -> int | None:
        self.process.join(0.1)
        return self.process.exitcode

    async def stop(self, grace: float = _STOP_GRACE) -> None:
        """Close the socket (the worker exits on EOF); kill it if it lingers."""
        if self.reaped:
            return
        if not self.conn.closed:
            self.conn.close()
        with anyio.CancelScope(shield=True), anyio.move_on_after(grace):
            await anyio.wait_readable(self.process.sentinel)
        await self.kill()

    async def kill(self) -> None:
        """SIGKILL the worker and reap it (it holds no state worth saving)."""
        if self.reaped:
            return
        self.reaped = True
        if not self.conn.closed:
            self.conn.close()
        if self.process.exitcode is None:
            self.process.kill()
            with anyio.CancelScope(shield=True), anyio.move_on_after(_STOP_GRACE):
                await anyio.wait_readable(self.process.sentinel)
        # The sentinel closes a moment before the child can be reaped, so
        # join with a (short, blocking) timeout rather than join(0).
        self.process.join(_STOP_GRACE)
        if self.process.exitcode is not None:
            self.process.close()


def _preload(modules: Sequence[str]) -> list[str]:
    """What the fork server imports before it starts (later calls change nothing):
    workers forked from it share those pages instead of importing their own copy.
    Measured in a backup: workers 38-40 -> 31-33 MiB private each, the server 5 ->
    17 MiB PSS; more with more workers."""
    return [__name__, *(m for m in modules if m != __name__)]


def start_fork_server(modules: Sequence[str] = ()) -> None:
    """Start the fork server now, with this module and ``modules`` (the module of
    the pool's ``initializer``) imported in it, as the first :class:`WorkerPool`
    would; returns at once, the server imports in its own process.

    That start is most of a pool's: a new interpreter importing the job code, ~0.2 s
    of CPU here, and a pool waits for it. A command that will start a pool calls
    this before it opens the repository, so the import runs on another core while
    the main process imports its backend and waits on the network; its pool then
    forks its workers at once (~0.02 s). A no-op where there is no fork server or
    one runs already.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(_preload(modules))
    _ensure_fork_server(forkserver)


_server_lock = threading.Lock()


def _ensure_fork_server(forkserver: Any) -> None:
    """Start the fork server unless it runs, without the working directory on its
    ``sys.path``: Python 3.11 starts it with ``-c`` (which puts the directory first)
    and ignores the ``sys_path`` it is given, so run from a directory holding another
    ``cairn/`` (a source checkout), the workers imported that code instead of this.
    ``PYTHONSAFEPATH`` (3.11's ``-P``) is set only while the server starts, so the
    commands cairn runs (``--password-command``, ...) never see it."""
    with _server_lock:
        saved = os.environ.get("PYTHONSAFEPATH")
        os.environ["PYTHONSAFEPATH"] = "1"
        try:
            forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONSAFEPATH"]
            else:
                os.environ["PYTHONSAFEPATH"] = saved


class WorkerPool:
    """``workers`` processes running module-level functions on plain data.

    Use as ``async with WorkerPool(2) as pool: await pool.run(fn, *args)``.
    ``initializer(*initargs)`` runs once in each worker (load keys, import
    modules). Leaving the context stops every worker, even when cancelled.

    With ``grow_after`` (seconds) the pool starts one worker and adds another,
    up to ``workers``, each time a job has waited that long for an idle one: a
    run with little CPU work (an incremental backup) never pays for processes
    (~30 MiB each) it would not keep busy.
    """

    def __init__(
        self,
        workers: int,
        *,
        start_method: str = "forkserver",
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        grow_after: float | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("a pool needs at least one worker")
        self.workers = workers
        # get_context's stub returns BaseContext, which lacks Process; every
        # concrete context has it.
        self._ctx: Any = multiprocessing.get_context(start_method)
        self._initializer = initializer
        self._initargs = initargs
        self._all: list[_Worker] = []
        self._grow_after = grow_after
        self._started = 0  # workers started or being started (grow_after)
        self._idle_tx, self._idle_rx = anyio.create_memory_object_stream[_Worker](workers)
        self._closed = False

    async def __aenter__(self) -> WorkerPool:
        try:
            first = self.workers if self._grow_after is None else 1
            self._started = first
            for worker in await self._spawn(first):
                self._idle_tx.send_nowait(worker)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and diagnostics)."""
        return [w.process.pid for w in self._all if w.alive and w.process.pid is not None]

    async def _spawn(self, count: int) -> list[_Worker]:
        # Process.start() blocks on the forkserver round trip: keep it off the loop.
        started = await anyio.to_thread.run_sync(self._start_processes, count)
        self._all.extend(started)
        for worker in started:
            ok, value = await worker.receive()  # the ready message
            if not ok:
                raise value
        return started

    def _start_processes(self, count: int) -> list[_Worker]:
        if self._ctx.get_start_method() == "forkserver":
            from multiprocessing import forkserver

            modules = [] if self._initializer is None else [self._initializer.__module__]
            self._ctx.set_forkserver_preload(_preload(modules))
            _ensure_fork_server(forkserver)
        started = []
        for _ in range(count):
            parent_conn, child_conn = self._ctx.Pipe()
            process = self._ctx.Process(
                target=_worker_main,
                args=(child_conn, self._initializer, self._initargs, worklog.level()),
                name="cairn-worker",
                daemon=True,  # multiprocessing's atexit hook reaps daemons too
            )
            process.start()
            child_conn.close()
            started.append(_Worker(process, parent_conn))
        return started

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn(*args)`` in a worker and return its result (or raise its error).

        ``fn`` must be a module-level function; top-level :class:`SlotRef`
        arguments arrive as memoryviews. If the caller is cancelled while the
        job runs, that worker is killed (so nothing writes into a slot the
        caller is about to release) and replaced on next use.
        """
        if self._closed:
            raise RuntimeError("worker pool is closed")
        message = pickle.dumps((fn, args), pickle.HIGHEST_PROTOCOL)
        worker = await self._idle_worker()
        try:
            if not worker.alive:
                self._all.remove(worker)
                (worker,) = await self._spawn(1)
            worker.hand_over([arg for arg in args if isinstance(arg, SlotRef)])
            worker.conn.send_bytes(message)
            ok, value = await worker.receive()
        except BaseException:
            await worker.kill()
            raise
        finally:
            self._idle_tx.send_nowait(worker)
        if not ok:
            raise value
        result: R = value
        return result

    async def _idle_worker(self) -> _Worker:
        """The next idle worker; with ``grow_after``, a new one if none has been
        idle for that long and the pool may grow."""
        if self._grow_after is None or self._started >= self.workers:
            return await self._idle_rx.receive()
        with anyio.move_on_after(self._grow_after):
            return await self._idle_rx.receive()
        if self._started >= self.workers:  # another job grew the pool meanwhile
            return await self._idle_rx.receive()
        self._started += 1
        try:
            (worker,) = await self._spawn(1)
        except BaseException:
            self._started -= 1
            raise
        return worker

    async def aclose(self) -> None:
        """Stop all workers: graceful EOF first, SIGKILL after a grace period."""
        self._closed = True
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for worker in self._all:
                    tg.start_soon(worker.stop)
            self._all.clear()
