"""Fault-injection wrapper, driven by a small spec; used by tests of retry, check, prune.

A spec is a list of ``Fault`` rules, or the same written as text, comma-separated::

    save#2=transient            the 2nd save raises TransientError
    save#1-3=transient          saves 1 to 3 fail
    stat#1=unreachable          the 1st stat cannot connect (refused, DNS, TLS)
    stat#1=unavailable          the 1st stat gets HTTP 502/503/504 from a gateway
    load:data/=truncate:10      every load of a name under data/ returns 10 bytes fewer
    load#1=flip:5               the 1st load has byte 5 flipped
    save=partial:100            saves store only the first 100 bytes, then fail (a
                                connection dropped mid-upload on a non-atomic store)
    stat=delay:0.5              stats are delayed by half a second
    remove=denied               removes raise PermissionDenied
    save#4-=error               the 4th save and every one after it fail
    write#3=kill                the process kills itself with SIGKILL just before its
                                3rd write (``write`` counts saves and removes together,
                                in call order), as a crash or ``kill -9`` would
    write#3=exit                the same with ``os._exit(137)`` (no signal)

``#N`` numbers every call of the operation, whatever its name (``write`` every save
and remove); a ``:prefix`` only narrows which of those calls the rule applies to, so
``load:index/#2`` fails the 2nd load if it is of an index file, not the 2nd index load.

With no rules the wrapper passes every call through unchanged. ``kill`` and ``exit``
act before the call reaches the backend, so ``write#N=kill`` stops a process after
exactly N-1 completed writes; sweeping N over 1..(writes of a clean run) crashes a
command at every point where the repository changes.

:data:`ENV_VAR` (``CAIRN_TEST_FAULTS``) holds a spec for the ``cairn`` command itself
(read by :func:`cairn.cli.common.open_backend`), so tests can crash or fail a real
command line deterministically.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import anyio

from cairn.backends.base import (
    Backend,
    BackendError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    ServerUnavailable,
    TransientError,
    Unreachable,
)
from cairn.backends.forward import ForwardingBackend

ERRORS: dict[str, type[BackendError]] = {
    "transient": TransientError,
    "unreachable": Unreachable,
    "unavailable": ServerUnavailable,
    "denied": PermissionDenied,
    "notfound": NotFound,
    "quota": QuotaExceeded,
    "error": BackendError,
}
ACTIONS = ("fail", "truncate", "flip", "delay", "partial", "kill", "exit")
_RULE = re.compile(
    r"^(?P<op>save|load|stat|list|remove|write)(?::(?P<match>[^#=]*))?"
    r"(?:#(?P<first>\d+)(?P<range>-(?P<last>\d+)?)?)?=(?P<action>[a-z]+)(?::(?P<arg>[0-9.]+))?$"
)
#: Environment variable with a fault spec for the ``cairn`` command (tests only).
ENV_VAR = "CAIRN_TEST_FAULTS"
#: Operations counted together as ``write``: the ones that change the repository.
WRITES = ("save", "remove")


@dataclass(frozen=True)
class Fault:
    """One rule: which calls (op, name prefix, call numbers) and what happens to them.

    ``first``/``last`` count matching calls from 1; ``last=None`` means every call
    from ``first`` on. ``action`` is ``fail`` (raise ``error``), ``truncate`` (drop
    ``arg`` bytes from a load's end), ``flip`` (invert byte ``arg`` of a load),
    ``delay`` (sleep ``arg`` seconds first), ``partial`` (store ``arg`` bytes of a
    save, then raise ``error``), ``kill`` (SIGKILL this process) or ``exit``
    (``os._exit(137)``). ``op`` ``write`` matches saves and removes, counted together.
    """

    op: str
    action: str = "fail"
    error: type[BackendError] = TransientError
    arg: float = 0
    match: str = ""
    first: int = 1
    last: int | None = None

    def applies(self, op: str, name: str, call: int) -> bool:
        if op != self.op or not name.startswith(self.match) or call < self.first:
            return False
        return self.last is None or call <= self.last


def parse_faults(spec: str) -> list[Fault]:
    """Parse the text form shown in the module docstring."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = _RULE.match(part)
        if not m:
            raise ValueError(f"malformed fault rule {part!r}")
        word, arg = m["action"], float(m["arg"] or 0)
        first = int(m["first"] or 1)
        if m["last"]:
            last: int | None = int(m["last"])
        else:  # "#N" is call N only; "#N-" is call N and every one after it
            last = None if m["range"] or not m["first"] else first
        if word in ERRORS:
            fault = Fault(m["op"], "fail", ERRORS[word], arg, m["match"] or "", first, last)
        elif word in ACTIONS:
            fault = Fault(m["op"], word, TransientError, arg, m["match"] or "", first, last)
        else:
            raise ValueError(f"unknown fault action {word!r} in {part!r}")
        faults.append(fault)
    return faults


class FaultyBackend(ForwardingBackend):
    """Applies ``faults`` to matching calls; counts calls per operation."""

    def __init__(self, inner: Backend, faults: Sequence[Fault] | str = ()) -> None:
        super().__init__(inner)
        self.faults = parse_faults(faults) if isinstance(faults, str) else list(faults)
        self.calls: dict[str, int] = {}

    def _match(self, op: str, name: str) -> list[Fault]:
        self.calls[op] = call = self.calls.get(op, 0) + 1
        found = [f for f in self.faults if f.applies(op, name, call)]
        if op in WRITES:
            self.calls["write"] = write = self.calls.get("write", 0) + 1
            found += [f for f in self.faults if f.applies("write", name, write)]
        return found

    @staticmethod
    async def _before(faults: list[Fault], op: str, name: str) -> None:
        for fault in faults:
            if fault.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault.action == "exit":
                os._exit(137)
            elif fault.action == "delay":
                await anyio.sleep(fault.arg)
            elif fault.action == "fail":
                raise fault.error(f"{name}: injected {op} failure")

    async def save(self, name: str, data: bytes | memoryview) -> None:
        faults = self._match("save", name)
        await self._before(faults, "save", name)
        for fault in faults:
            if fault.action == "partial":
                await self.inner.save(name, memoryview(data)[: int(fault.arg)])
                raise fault.error(f"{name}: injected connection drop during save")
        await self.inner.save(name, data)

    async def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        faults = self._match("load", name)
        await self._before(faults, "load", name)
        data = await self.inner.load(name, offset, length)
        for fault in faults:
            if fault.action == "truncate":
                data = data[: max(0, len(data) - int(fault.arg))]
            elif fault.action == "flip" and int(fault.arg) < len(data):
                pos = int(fault.arg)
                data = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :]
        return data

    async def stat(self, name: str) -> int:
        await self._before(self._match("stat", name), "stat", name)
        return await self.inner.stat(name)

    async def remove(self, name: str) -> None:
        await self._before(self._match("remove", name), "remove", name)
        await self.inner.remove(name)

    async def list(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        await self._before(self._match("list", prefix), "list", prefix)
        async for entry in self.inner.list(prefix):
            yield entry
