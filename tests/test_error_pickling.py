"""Every exception cairn defines survives pickling: errors raised in a worker process
travel back to the parent, and one that cannot be rebuilt there used to turn a
corrupt blob into ``internal error: TypeError: ... missing 2 required positional
arguments`` and abort the whole restore."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
from typing import Any

import pytest

import cairn
from cairn.pipeline.errors import RemoteError
from cairn.pipeline.workers import WorkerPool
from cairn.repo.errors import CorruptedObject


def _cairn_exceptions() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(cairn.__path__, "cairn."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional extra (e.g. pyfuse3) that is not installed
            continue
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, Exception)
                and obj.__module__.startswith("cairn.")
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[name] for name in sorted(found)]


EXCEPTIONS = _cairn_exceptions()


def _argument(name: str, annotation: Any, n: int) -> Any:
    text = str(annotation)
    if "BaseException" in text or "Exception" in text:
        return ValueError(f"cause {n}")
    if text.startswith("int"):
        return 2 if name == "signum" else 40 + n
    if text.startswith("bytes"):
        return b"\x01name"
    if text.startswith("list"):
        return [(f"{name}-{n}", "no such file or directory")]
    return f"{name}-{n}"


def _instance(cls: type[BaseException]) -> BaseException:
    params = [
        p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self"
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.default is p.empty
    ]
    if not params and cls.__init__ in (Exception.__init__, BaseException.__init__):
        return cls("a message for the user")
    return cls(*(_argument(p.name, p.annotation, i) for i, p in enumerate(params)))


def test_the_walk_finds_the_exception_families() -> None:
    names = {cls.__name__ for cls in EXCEPTIONS}
    assert {"CorruptedObject", "UnsupportedVersion", "NotFound", "StageError"} <= names
    assert len(EXCEPTIONS) >= 25


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_exception_round_trips_through_pickle(cls: type[BaseException]) -> None:
    exc = _instance(cls)
    exc.add_note("in worker: somewhere")
    back = pickle.loads(pickle.dumps(exc, pickle.HIGHEST_PROTOCOL))
    assert type(back) is cls
    assert str(back) == str(exc)
    assert back.args == exc.args
    assert getattr(back, "__notes__", None) == ["in worker: somewhere"]
    assert getattr(back, "exit_code", None) == getattr(exc, "exit_code", None)
    mine = {k: repr(v) for k, v in vars(exc).items()}
    assert {k: repr(v) for k, v in vars(back).items()} == mine
    if exc.__cause__ is not None:
        assert repr(back.__cause__) == repr(exc.__cause__)


def _raise_corrupted() -> None:
    raise CorruptedObject("data blob", "ab" * 32, "authentication failed")


class _Unloadable(Exception):
    """Pickles, but cannot be rebuilt in the parent (its ``__init__`` wants more)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} and {b}")


def _raise_unloadable() -> None:
    raise _Unloadable("first", "second")


@pytest.mark.anyio
async def test_a_worker_error_arrives_as_itself_or_as_a_remote_error_with_its_text() -> None:
    async with WorkerPool(1) as pool:
        with pytest.raises(CorruptedObject) as caught:
            await pool.run(_raise_corrupted)
        assert caught.value.kind == "data blob" and caught.value.problem == "authentication failed"
        with pytest.raises(RemoteError, match="first and second"):
            await pool.run(_raise_unloadable)
        # The worker is still usable afterwards.
        with pytest.raises(CorruptedObject):
            await pool.run(_raise_corrupted)
