"""Strict msgpack decoding: every schema violation becomes ``CorruptedObject``.

Decoders in ``repo/`` read untrusted-looking data (authenticated, but possibly written by
a buggy or newer cairn). They must never return wrong data or leak a ``KeyError`` /
``TypeError``: this module turns "not what the spec says" into one error type.
"""

from __future__ import annotations

from typing import Any, NoReturn

import msgpack

from cairn.repo.errors import CorruptedObject

_MISSING: Any = object()


def pack(obj: object) -> bytes:
    """msgpack with bin for bytes and str for text (the format's only encoding)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(payload: bytes | memoryview, kind: str, name: str) -> Any:
    """Decode one msgpack value, the whole payload, no trailing bytes."""
    try:
        # strict_map_key=False: tree xattrs are maps with bin keys.
        return msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise CorruptedObject(kind, name, f"malformed msgpack ({type(exc).__name__})") from None


class Reader:
    """Typed field access to a decoded msgpack map, naming the object on errors."""

    __slots__ = ("kind", "map", "name")

    def __init__(self, obj: object, kind: str, name: str, what: str = "object") -> None:
        self.kind = kind
        self.name = name
        if not isinstance(obj, dict):
            self.fail(f"{what} is not a map")
        self.map: dict[Any, Any] = obj

    def fail(self, problem: str) -> NoReturn:
        raise CorruptedObject(self.kind, self.name, problem)

    def _get(self, key: str, default: Any) -> Any:
        if key in self.map:
            return self.map[key]
        if default is _MISSING:
            self.fail(f"field {key!r} missing")
        return default

    def get_int(self, key: str, default: Any = _MISSING, *, minimum: int | None = 0) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if type(value) is not int or (minimum is not None and value < minimum):
            self.fail(f"field {key!r} is not a valid integer")
        return value

    def get_bool(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if type(value) is not bool:
            self.fail(f"field {key!r} is not a boolean")
        return value

    def get_str(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            self.fail(f"field {key!r} is not a string")
        return value

    def get_bytes(self, key: str, default: Any = _MISSING, *, size: int | None = None) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, bytes) or (size is not None and len(value) != size):
            self.fail(f"field {key!r} is not {'a ' + str(size) + '-byte' if size else 'a'} bin")
        return value

    def get_list(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list):
            self.fail(f"field {key!r} is not an array")
        return value

    def get_str_list(self, key: str, default: Any = _MISSING) -> Any:
        value = self.get_list(key, default)
        if value is not default and not all(isinstance(v, str) for v in value):
            self.fail(f"field {key!r} is not an array of strings")
        return value

    def get_bytes_list(self, key: str, default: Any = _MISSING, *, size: int | None = None) -> Any:
        value = self.get_list(key, default)
        if value is not default and not all(
            isinstance(v, bytes) and (size is None or len(v) == size) for v in value
        ):
            self.fail(f"field {key!r} is not an array of bin")
        return value
