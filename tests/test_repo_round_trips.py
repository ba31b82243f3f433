"""Round trips a command spends opening a repository and taking its lock: over a
20 ms link each one is felt (bench/latency.py), so none is spent twice and
independent ones overlap."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
import trio

from cairn.backends.base import Backend
from cairn.backends.forward import ForwardingBackend
from cairn.backends.local import LocalBackend
from cairn.backends.logged import LoggedBackend
from cairn.repo.errors import RepositoryNotFound
from cairn.repo.keyfile import KdfParams
from cairn.repo.lock import Lock, encode_lock
from cairn.repo.repository import init_repository, open_repository
from cairn.stages.locking import repository_lock


def _loads(events: list[dict[str, object]], prefix: str) -> list[str]:
    return [
        str(e["name"])
        for e in events
        if e["event"] == "backend.load" and str(e["name"]).startswith(prefix)
    ]


@pytest.mark.trio
async def test_taking_a_lock_reads_the_other_locks_not_its_own(tmp_path: Path) -> None:
    backend = LoggedBackend(LocalBackend(tmp_path / "repo"))
    repo = await init_repository(
        backend, "pw", hostname="h", username="u", kdf_params=KdfParams(64, 1, 1)
    )
    now = time.time_ns()
    # Another live client's shared lock: it must be read (a conflict check), ours not.
    other = Lock(
        exclusive=False,
        hostname=socket.gethostname(),
        username="someone",
        pid=os.getpid(),
        created_ns=now,
        refreshed_ns=now,
    )
    other_id = await repo.save_sealed("locks", encode_lock(other))
    with structlog.testing.capture_logs() as events:
        async with repository_lock(repo, exclusive=False) as held:
            pass
    loaded = _loads(events, "locks/")
    assert f"locks/{held.id}" not in loaded
    assert loaded.count(f"locks/{other_id}") == 2  # before saving ours, and after


class _ConfigAfterKeyList(ForwardingBackend):
    """Answers ``config`` only once the key files are being listed: a client that
    asks for one after the other waits forever."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.listing = trio.Event()

    async def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if name == "config":
            await self.listing.wait()
        return await self.inner.load(name, offset, length)

    async def list(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        if prefix == "keys/":
            self.listing.set()
        async for entry in self.inner.list(prefix):
            yield entry


@pytest.mark.trio
async def test_open_asks_for_the_config_and_the_key_list_at_once(tmp_path: Path) -> None:
    local = LocalBackend(tmp_path / "repo")
    made = await init_repository(
        local, "pw", hostname="h", username="u", kdf_params=KdfParams(64, 1, 1)
    )
    with trio.fail_after(30):  # a deadlock guard, not a timing: sequential never ends
        repo = await open_repository(_ConfigAfterKeyList(local), "pw")
    assert repo.config.id == made.config.id


@pytest.mark.trio
async def test_open_without_a_config_says_no_repository(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepositoryNotFound):  # not "no key files", also true
        await open_repository(LocalBackend(tmp_path / "empty"), "pw")
