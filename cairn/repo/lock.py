"""Lock objects: who holds the repository, and when a lock may be considered stale.

Stored as ``seal(crypto, "lock", msgpack(map))`` under ``locks/<storage id>``. A holder
refreshes its lock by writing a new one (new ``refreshed_ns``) and removing the old.
The locking protocol itself (acquire, refresh, release) lives with its user; this
module is the format and the staleness rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cairn.repo import schema
from cairn.repo.errors import UnsupportedVersion

LOCK_VERSION = 1
# restic's value: a holder refreshes every 5 minutes, so 30 minutes of silence means
# it is gone (or partitioned long enough that its operation has failed anyway).
STALE_AFTER_NS = 30 * 60 * 1_000_000_000


@dataclass
class Lock:
    """One lock: exclusive (prune, forget) or shared (backup, check, restore)."""

    exclusive: bool
    hostname: str
    username: str
    pid: int
    created_ns: int
    refreshed_ns: int

    def describe(self) -> str:
        """Who holds it, for ``LockFailed`` messages."""
        kind = "exclusive" if self.exclusive else "shared"
        return f"{self.username}@{self.hostname} (PID {self.pid}, {kind} lock)"


def encode_lock(lock: Lock) -> bytes:
    """The msgpack payload of a lock (seal it with kind ``"lock"``)."""
    return schema.pack(
        {
            "v": LOCK_VERSION,
            "exclusive": lock.exclusive,
            "hostname": lock.hostname,
            "username": lock.username,
            "pid": lock.pid,
            "created_ns": lock.created_ns,
            "refreshed_ns": lock.refreshed_ns,
        }
    )


def decode_lock(payload: bytes, name: str = "") -> Lock:
    """Parse and validate a lock payload; ``CorruptedObject`` on any deviation."""
    r = schema.Reader(schema.unpack(payload, "lock", name), "lock", name)
    version = r.get_int("v")
    if version != LOCK_VERSION:
        raise UnsupportedVersion("lock", name, f"lock version {version} is not supported")
    return Lock(
        exclusive=r.get_bool("exclusive"),
        hostname=r.get_str("hostname"),
        username=r.get_str("username"),
        pid=r.get_int("pid"),
        created_ns=r.get_int("created_ns", minimum=None),
        refreshed_ns=r.get_int("refreshed_ns", minimum=None),
    )


def is_stale(lock: Lock, now_ns: int, hostname: str, pid_alive: Callable[[int], bool]) -> bool:
    """Whether a lock may be removed: not refreshed for 30 min, or its local PID is gone.

    ``now_ns`` and ``pid_alive`` are injected so tests need no clock or processes.
    """
    if now_ns - lock.refreshed_ns > STALE_AFTER_NS:
        return True
    return lock.hostname == hostname and not pid_alive(lock.pid)
