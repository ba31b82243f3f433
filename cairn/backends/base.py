"""The storage protocol every backend implements, and its typed errors.

A backend stores opaque bytes under slash-separated names such as ``config``,
``keys/<id>``, ``snapshots/<id>``, ``index/<id>``, ``data/<xx>/<id>`` and
``locks/<id>``. It never sees keys or plaintext.

Contract (checked for every backend by ``tests/test_backend_conformance.py``):

* ``save(name, data)`` is atomic: a reader sees either nothing or all of ``data``,
  never a prefix. Saving an existing name replaces it only when ``atomic_replace``
  is true; otherwise the caller must not rely on replacing (content-addressed names
  never need it). Retrying a save with the same bytes is harmless (idempotent).
* Read-after-write: once ``save`` returns, ``load``, ``stat`` and ``list`` see it.
* ``load(name, offset, length)`` returns exactly ``length`` bytes from ``offset``
  (or to the end when ``length`` is None); asking past the end raises
  ``ObjectTruncated`` rather than returning fewer bytes silently.
* ``list(prefix)`` yields ``(name, size)`` for every object under a directory prefix
  (``"data/"`` includes the fan-out subdirectories); order is unspecified.
* ``remove(name)`` raises ``NotFound`` when there is nothing to remove.
* ``aclose()`` releases connections and processes, and completes even on failure.
* Optional ``spool_dir``: where a writer should assemble packs (a local repository's
  own directory). ``save`` of a view of a whole :class:`SpoolMap` may then link that
  file into place instead of copying it; any other backend just reads the view.
* Errors are the subclasses of ``BackendError`` below; anything a retry may cure is a
  ``TransientError``, everything else is permanent. A failure to connect at all is
  ``Unreachable`` (a ``TransientError``), so that the retry wrapper can tell a server
  that never answered from one that stopped answering.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

# Object kinds and the directory each lives in.
KINDS = ("keys", "snapshots", "index", "data", "locks")
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")
_DATA_DIR = re.compile(r"^data/[0-9a-f]{2}/$")
# Names never start with a dot: ``..`` would escape the repository and backends keep
# their temporary files under dot-names (``.tmp-*``) that ``list`` must not report.
_NAME = re.compile(
    r"^(config|(keys|snapshots|index|locks)/[0-9a-zA-Z_-][0-9a-zA-Z_.-]*"
    r"|data/[0-9a-f]{2}/[0-9a-f]{64})$"
)


def rebuild_error(cls: type[BaseException], args: tuple, state: dict) -> BaseException:
    """Unpickle an exception without calling its ``__init__`` (whose signature need not
    match ``args``): class, ``args`` (the message) and attributes come back as they were."""
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class BackendError(Exception):
    """A storage operation failed; the message is written for the user.

    Errors cross process boundaries (a worker's job fails): every subclass pickles
    with its class, message and attributes, whatever its ``__init__`` takes.
    """

    exit_code = 1

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild_error, (type(self), self.args, self.__dict__))


class NotFound(BackendError):
    """The named object does not exist."""


class AlreadyExists(BackendError):
    """The named object exists and the operation must not replace it."""


class PermissionDenied(BackendError):
    """The backend refused access (credentials, file modes)."""


class Retained(PermissionDenied):
    """The object is under retention (S3 Object Lock: a retain-until date or a legal
    hold) and cannot be deleted yet. ``until`` is the date as text, or "legal hold"."""

    def __init__(self, message: str, until: str = "") -> None:
        super().__init__(message)
        self.until = until


class QuotaExceeded(BackendError):
    """No space left, or a storage quota is reached."""


class TransientError(BackendError):
    """A failure a retry may cure: connection reset, timeout, 5xx, throttling."""


class Unreachable(TransientError):
    """No connection could be made: refused, DNS failure, TLS failure, connect timeout.

    Transient once the backend has answered (a server restarting mid-backup), but a
    backend that never answered is most likely down or misconfigured: the retry
    wrapper then fails at once instead of backing off for minutes.
    """


class ServerUnavailable(TransientError):
    """The server, or a proxy or gateway in front of it, answered HTTP 502, 503 or 504:
    the service behind the address is down, starting or overloaded.

    Transient once the backend has answered a request, but as long as it has not, an
    answer like this says nothing more than ``Unreachable`` does (a reverse proxy whose
    server is down answers 502 at once): the retry wrapper fails at once here too.
    """


class ObjectTruncated(BackendError):
    """A ranged read asked for bytes past the end of the stored object."""


class InvalidName(BackendError, ValueError):
    """The object name is not one the repository layout allows."""


def object_name(kind: str, object_id: str) -> str:
    """The backend name of an object: ``data/`` objects fan out by two hex chars."""
    if kind == "config":
        return "config"
    if kind not in KINDS:
        raise InvalidName(f"unknown object kind {kind!r}")
    if kind == "data":
        return f"data/{object_id[:2]}/{object_id}"
    return f"{kind}/{object_id}"


def validate_name(name: str) -> str:
    """Reject anything but the repository layout (no ``..``, no absolute paths)."""
    if not _NAME.match(name):
        raise InvalidName(f"invalid object name {name!r}")
    return name


def is_hex_id(text: str) -> bool:
    """Whether ``text`` is a 64-character lowercase hex id."""
    return bool(_HEX_ID.match(text))


def validate_prefix(prefix: str) -> str:
    """Accept the prefixes ``list`` understands: ``""``, ``<kind>/`` and ``data/<xx>/``."""
    if prefix == "" or prefix in {f"{kind}/" for kind in KINDS} or _DATA_DIR.match(prefix):
        return prefix
    raise InvalidName(f"invalid list prefix {prefix!r}")


class SpoolMap(mmap.mmap):
    """The read-only map of a spooled pack, knowing the descriptor it maps: a backend
    on the same filesystem can link that file into place instead of copying its
    bytes (:func:`spooled_descriptor`)."""

    fd: int = -1


def spooled_descriptor(data: bytes | memoryview) -> int | None:
    """The descriptor of the linkable spool file ``data`` is the *whole* of, or None.

    Linkable means created with ``O_TMPFILE`` (without ``O_EXCL``): ``linkat`` can
    give it a name. A view of part of a pack (say, a cut-off upload) is never one."""
    if not isinstance(data, memoryview):
        return None
    source = data.obj
    if not isinstance(source, SpoolMap) or source.fd < 0 or data.nbytes != len(source):
        return None
    return source.fd


@runtime_checkable
class Backend(Protocol):
    """The async storage protocol. See the module docstring for the contract."""

    @property
    def location(self) -> str:
        """A user-facing description, e.g. ``local:/srv/repo``."""
        ...

    @property
    def connections(self) -> int:
        """How many concurrent operations this backend handles well."""
        ...

    @property
    def atomic_replace(self) -> bool:
        """Whether ``save`` over an existing name atomically replaces it."""
        ...

    async def save(self, name: str, data: bytes | memoryview) -> None: ...

    async def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes: ...

    async def stat(self, name: str) -> int:
        """Size in bytes; raises ``NotFound``."""
        ...

    def list(self, prefix: str) -> AsyncIterator[tuple[str, int]]: ...

    async def remove(self, name: str) -> None:
        """Delete one object; raises ``NotFound``."""
        ...

    async def create_layout(self) -> None:
        """Prepare an empty repository (bucket, directories) for ``cairn init``.

        Idempotent; refusing when ``config`` already exists is the caller's job.
        """
        ...

    async def aclose(self) -> None: ...
