"""Basic authentication against an htpasswd file of bcrypt entries (``htpasswd -B``).

The file is re-read when its modification time or size changes (checked at most
once a second), so users are added or removed without a restart. bcrypt is slow by
design (~3 ms at ``htpasswd -B``'s cost 5, 250 ms at cost 12) and every REST request
carries the credentials: a password that verified is remembered — as a SHA-256 of
user and password, never in clear — until the file changes, as rest-server does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from pathlib import Path

import anyio.to_thread
import bcrypt
import structlog

log = structlog.get_logger("cairn.serve")
RECHECK_SECONDS = 1.0
_BCRYPT_PREFIXES = ("$2y$", "$2b$", "$2a$")


class HtpasswdError(Exception):
    """The htpasswd file cannot be read (at start: a one-line error, exit 1)."""

    exit_code = 1


class Htpasswd:
    """Users and their bcrypt hashes, from one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._users: dict[str, bytes] = {}
        self._signature: tuple[int, int] | None = None
        self._checked = 0.0
        self._verified: set[bytes] = set()
        self._load()

    def _load(self) -> None:
        try:
            st = self.path.stat()
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise HtpasswdError(f"cannot read htpasswd file {self.path}: {exc.strerror}") from exc
        users: dict[str, bytes] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if not sep or not hashed.startswith(_BCRYPT_PREFIXES):
                # MD5/SHA1/crypt entries are weak; refusing them beats accepting them.
                log.warning(
                    "serve.htpasswd_skipped",
                    file=str(self.path),
                    line=number,
                    reason="not a bcrypt entry (use htpasswd -B)",
                )
                continue
            users[user] = hashed.encode()
        self._users = users
        self._signature = (st.st_mtime_ns, st.st_size)
        self._verified.clear()
        log.info("serve.htpasswd_loaded", file=str(self.path), users=len(users))

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RECHECK_SECONDS:
            return
        self._checked = now
        try:
            st = self.path.stat()
        except OSError:
            return  # keep the users we have; a file being replaced reappears
        if (st.st_mtime_ns, st.st_size) != self._signature:
            try:
                self._load()
            except HtpasswdError as exc:
                log.warning("serve.htpasswd_reload_failed", error=str(exc))

    async def check(self, header: str | None) -> str | None:
        """The user an ``Authorization`` header authenticates, or None."""
        self._maybe_reload()
        credentials = _parse_basic(header)
        if credentials is None:
            return None
        user, password = credentials
        hashed = self._users.get(user)
        if hashed is None:
            return None
        token = hashlib.sha256(hashed + b"\0" + user.encode() + b"\0" + password.encode()).digest()
        if token in self._verified:
            return user
        ok = await anyio.to_thread.run_sync(bcrypt.checkpw, password.encode(), hashed)
        if ok:
            self._verified.add(token)
            return user
        return None


def _parse_basic(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None
