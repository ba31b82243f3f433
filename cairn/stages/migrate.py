"""``cairn migrate``: copy a repository's files, as they are, to another backend.

The same repository (same keys, same IDs) on a second backend: nothing is decrypted
or re-encoded. Each phase is one pipeline (docs/architecture.md, "Migrate")::

    plan -> list-destination -> compare -> transfer (N tasks) -> tally

* **plan** names the prefixes: ``data/`` as one when the destination holds few packs
  (one listing per side), else its 256 shards (``data/00/`` … ``data/ff/``);
* **list-destination** reads the destination's listing of a prefix into a dict, one
  prefix ahead of the comparison;
* **compare** streams the source's listing of the prefix against it: what the
  destination lacks, or holds with another size, is sent; what it holds with the right
  size is present (and a sample of it re-read to catch silent corruption);
* **transfer** loads one object whole from the source, hashes it (every name but
  ``config``'s and non-hex key names is the BLAKE3 of the stored bytes, so a damaged
  source object is refused, not copied), saves it to the destination and, for a
  sample, reads it back and compares hashes; all objects in flight stay within
  ``in_flight_bytes`` (one larger object goes alone);
* **tally** counts.

Phases run one after another so that the destination is a consistent repository at
every moment (docs/migrate.md): ``keys/``, ``config``, ``data/``, ``index/``,
``snapshots/``; ``--delete`` removes extra objects only after all of them, newest
kinds first (snapshots, index, data, keys). Locks are never copied.

Backends' saves are atomic (backends/base.py): an object the destination lists is
whole, so a run killed at any point resumes by sending only what is missing.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from cairn.backends.base import Backend, NotFound
from cairn.backends.location import redact_location
from cairn.backends.throttle import UPLOAD_PREPAID, charge, prepaid_upload_limiter
from cairn.pipeline import HeldBytes, Pipeline, PipelineOptions, PipelineSnapshot, raising_causes
from cairn.stages.destination import (
    ByteBudget,
    ForeignDestination,
    check_destination,
    content_id,
    hashed_name,
    listing,
    listing_up_to,
    object_key,
)

__all__ = ["ForeignDestination", "MigrateOptions", "MigrateStats", "Migrator"]

log = structlog.get_logger("cairn.migrate")

MiB = 1024 * 1024
DATA_SHARDS = tuple(f"data/{i:02x}/" for i in range(256))
# The phases in the order their objects must reach the destination.
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("keys", ("keys/",)),
    ("config", ("config",)),
    ("data", DATA_SHARDS),
    ("index", ("index/",)),
    ("snapshots", ("snapshots/",)),
)
# --delete's order: what refers to others goes first.
DELETE_ORDER = ("snapshots/", "index/", *DATA_SHARDS, "keys/")

# The destination's data/ listing is held whole up to this many packs (~5 MB; one
# shard's worth at 12 M packs); beyond, data/ is planned shard by shard.
SMALL_LISTING = 50_000
# Shards' destination listings read at once, ahead of the comparison: a listing is
# mostly round trips (S3: one per 1000 names); one overlaps them with the source's
# listing of the shard being compared, and at most three shards' listings exist
# (one being read, one handed over, one compared). More in parallel would hold more:
# an ordered stage queues finished ones.
LISTINGS_AHEAD = 1

LIST_HINT = "none: listing the two backends (round trips)"
TRANSFER_HINT = "--connections (transfers in flight)"
THROTTLE_HINT = "--limit-upload/--limit-download"

SEND, REPLACE, CHECK = "send", "replace", "check"


@dataclass(frozen=True)
class MigrateOptions:
    """What one migration does; the CLI fills it from flags."""

    # Objects in flight at once; each holds one object in memory (the memory bound).
    transfers: int = 5
    # Percent of the objects written, and of those found present, read back from the
    # destination and compared by hash. 1 %: cheap, and over a few runs of a replica
    # kept current it catches storage that loses or garbles objects silently.
    verify_sample: float = 1.0
    # Hash-check every object already present (downloads the whole destination).
    verify_existing: bool = False
    # Bytes of objects in flight at once, whatever --connections says (one larger
    # object still goes, alone): three default packs. 64 MiB peaked at 197 MiB for
    # a local → SeaweedFS migration, 48 at 133-164 (the S3 client's socket buffer
    # copies a body again; the interpreter is ~90 MiB), at the same speed: the
    # server, not the number of uploads, limited it (bench/migrate.py).
    in_flight_bytes: int = 48 * MiB
    # The destination's data/ listing is held whole up to this many packs, else
    # data/ is planned shard by shard (SMALL_LISTING; tests lower it).
    whole_listing: int = SMALL_LISTING
    delete: bool = False
    dry_run: bool = False
    # Lock the destination (shared; exclusive with --delete) once it has a config.
    lock: bool = True
    retry_lock: float = 0.0
    seed: int | None = None  # for the sample (tests)
    options: PipelineOptions = field(default_factory=PipelineOptions)


@dataclass
class MigrateStats:
    """Counts of one run; polled by the progress reporter."""

    objects_listed: int = 0
    bytes_listed: int = 0
    objects_total: int | None = None  # from a separate listing, when progress wants it
    bytes_total: int | None = None
    objects_present: int = 0
    bytes_present: int = 0
    objects_sent: int = 0
    bytes_sent: int = 0
    objects_verified: int = 0
    bytes_verified: int = 0
    objects_repaired: int = 0
    objects_deleted: int = 0
    bytes_deleted: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    held: HeldBytes = field(default_factory=HeldBytes)
    pipelines: list[PipelineSnapshot] = field(default_factory=list)

    @property
    def objects_done(self) -> int:
        return self.objects_present + self.objects_sent + len(self.errors)

    @property
    def bytes_done(self) -> int:
        return self.bytes_present + self.bytes_sent


@dataclass(frozen=True)
class Shard:
    """A prefix to plan, with the destination's listing of it once it is read
    (storage ID bytes, or the name, to size)."""

    prefix: str
    there: dict[Any, int] | None = None


@dataclass(frozen=True)
class Work:
    """One object the plan hands to the transfer stage."""

    name: str
    size: int
    action: str  # SEND (absent), REPLACE (wrong size or corrupt), CHECK (present, sampled)

    @staticmethod
    def nbytes(item: Work) -> int:
        return item.size


class Migrator:
    """Runs the phases of one migration from ``source`` to ``dest``.

    ``report(name, problem)`` is called for each object that could not be migrated
    (damaged in the source, or read back differently from the destination); the run
    goes on and the CLI ends with exit 1.
    """

    def __init__(
        self,
        repo: Any,
        source: Backend,
        dest: Backend,
        options: MigrateOptions,
        report: Callable[[str, str], None] | None = None,
    ) -> None:
        self.repo = repo
        self.source = source
        self.dest = dest
        self.options = options
        self.report = report or (lambda name, problem: None)
        self.stats = MigrateStats()
        self._rng = random.Random(options.seed)
        self._budget = ByteBudget(options.in_flight_bytes)
        self._prepay_limiter = prepaid_upload_limiter(dest)
        self._replace_config = False

    async def run(self, *, count_totals: bool = False) -> MigrateStats:
        """Every phase in order, then ``--delete``; returns the counts."""
        has_config, config_ok = await check_destination(self.repo, self.dest, self.source)
        self._replace_config = not config_ok
        log.info(
            "migrate.started",
            destination=redact_location(self.dest.location),
            destination_has_config=has_config,
            dry_run=self.options.dry_run,
            transfers=self.options.transfers,
        )
        if not has_config and not self.options.dry_run:
            await self.dest.create_layout()
        async with anyio.create_task_group() as tg:
            if count_totals:
                tg.start_soon(self._count_totals)
            await self._all_phases()
            tg.cancel_scope.cancel()
        s = self.stats
        log.info(
            "migrate.finished",
            objects_sent=s.objects_sent,
            bytes_sent=s.bytes_sent,
            objects_present=s.objects_present,
            objects_verified=s.objects_verified,
            objects_repaired=s.objects_repaired,
            objects_deleted=s.objects_deleted,
            errors=len(s.errors),
            held_peak=s.held.peak,
        )
        return s

    async def _all_phases(self) -> None:
        first, rest = PHASES[:2], PHASES[2:]
        for phase, prefixes in first:
            await self._phase(phase, prefixes)
        # keys and config are there by now: the destination can be locked.
        async with self._lock_destination():
            for phase, prefixes in rest:
                await self._phase(phase, prefixes)
            if self.options.delete:
                await self._delete()

    def _lock_destination(self) -> AbstractAsyncContextManager[Any]:
        """A lock on the destination while data moves: shared, as a backup takes (we
        add objects), or exclusive with ``--delete``, as prune takes (we remove them).
        It keeps a prune of the replica from deleting packs whose index is still on
        its way, and two migrations with ``--delete`` from running into each other."""
        if not self.options.lock or self.options.dry_run:
            return nullcontext()
        from cairn.stages.locking import repository_lock

        return repository_lock(
            self.repo.on_backend(self.dest),
            exclusive=self.options.delete,
            retry_seconds=self.options.retry_lock,
        )

    async def _count_totals(self) -> None:
        # A listing of its own, beside the plan's, so that progress has totals (and
        # an ETA) from early on; the plan itself only sees one prefix at a time.
        objects = size = 0
        for prefix in ("keys/", "config", "data/", "index/", "snapshots/"):
            async for _name, nbytes in self._list(self.source, prefix):
                objects += 1
                size += nbytes
        self.stats.objects_total, self.stats.bytes_total = objects, size

    @staticmethod
    async def _list(backend: Backend, prefix: str) -> AsyncIterator[tuple[str, int]]:
        """``list``, with ``config`` as a prefix of its own (a stat)."""
        if prefix != "config":
            async for entry in listing(backend, prefix):
                yield entry
            return
        try:
            yield "config", await backend.stat("config")
        except NotFound:
            return

    async def _phase(self, phase: str, prefixes: tuple[str, ...]) -> None:
        shards = await self._shards(prefixes)
        pipeline = (
            Pipeline(f"migrate-{phase}", options=self.options.options)
            .source("plan", shards)
            .map(
                "list-destination",
                self._list_destination,
                concurrency=LISTINGS_AHEAD,
                ordered=True,
                hint=LIST_HINT,
                capacity=0,
            )
            .map("compare", self._compare, hint=LIST_HINT, capacity=0)
            .map(
                "transfer",
                self._transfer,
                concurrency=self.options.transfers,
                sizeof=Work.nbytes,
                hint=TRANSFER_HINT,
                throttle_hint=THROTTLE_HINT,
                capacity=0,
            )
            .sink("tally", _nothing)
        )
        try:
            with raising_causes():
                await pipeline.run()
        finally:
            self.stats.pipelines.append(pipeline.snapshot(done=True))

    async def _shards(self, prefixes: tuple[str, ...]) -> list[Shard]:
        """The prefixes to plan. ``data/`` shard by shard, unless the destination
        holds at most ``whole_listing`` packs (a first run, a small repository): then
        one listing of each side instead of 256 — a round trip each on S3."""
        if prefixes != DATA_SHARDS:
            return [Shard(prefix) for prefix in prefixes]
        there = await listing_up_to(self.dest, "data/", self.options.whole_listing)
        if there is None:
            return [Shard(prefix) for prefix in prefixes]
        return [Shard("data/", there)]

    async def _list_destination(self, shard: Shard) -> Shard:
        """The destination's objects under the shard's prefix, by name."""
        if shard.there is None:
            listed = self._list(self.dest, shard.prefix)
            there = {object_key(name): size async for name, size in listed}
            shard = Shard(shard.prefix, there)
        return shard

    async def _compare(self, shard: Shard) -> AsyncIterator[Work]:
        """Stream the source's listing of a prefix against the destination's."""
        s = self.stats
        there = shard.there if shard.there is not None else {}
        async for name, size in self._list(self.source, shard.prefix):
            s.objects_listed += 1
            s.bytes_listed += size
            have = there.pop(object_key(name), None)
            if have is None:
                yield Work(name, size, SEND)
            elif have != size or (name == "config" and self._replace_config):
                if have != size:
                    log.warning("migrate.size_mismatch", name=name, size=size, destination=have)
                yield Work(name, size, REPLACE)
            elif self._check_existing(name):
                yield Work(name, size, CHECK)
            else:
                s.objects_present += 1
                s.bytes_present += size

    def _check_existing(self, name: str) -> bool:
        if self.options.dry_run or hashed_name(name) is None:
            return False
        return self.options.verify_existing or self._sampled()

    def _sampled(self) -> bool:
        return self._rng.random() * 100 < self.options.verify_sample

    async def _transfer(self, work: Work) -> None:
        # With an upload limit charged per whole object, pay before loading it: an
        # object waiting for the limit then holds no memory (backends/throttle.py).
        prepaid = work.action != CHECK and await self._prepay(work.size)
        async with self._budget.holding(work.size):
            await self._transfer_one(work, prepaid)

    async def _prepay(self, nbytes: int) -> bool:
        if self._prepay_limiter is None or self.options.dry_run:
            return False
        await charge(self._prepay_limiter, nbytes)
        return True

    async def _transfer_one(self, work: Work, prepaid: bool) -> None:
        s = self.stats
        if self.options.dry_run:
            log.info("migrate.would_send", name=work.name, bytes=work.size, action=work.action)
            s.objects_sent += 1
            s.bytes_sent += work.size
            return
        action = work.action
        if action == CHECK:
            if await self._intact(work):
                s.objects_present += 1
                s.bytes_present += work.size
                return
            action = REPLACE
            prepaid = await self._prepay(work.size)
        data = await self.source.load(work.name)
        with self.stats.held.holding(len(data)):
            digest = await content_id(data)
            expected = hashed_name(work.name)
            if expected is not None and digest != expected:
                self._problem(work.name, "damaged in the source: content does not match its name")
                return
            if action == REPLACE and not self.dest.atomic_replace:
                try:
                    await self.dest.remove(work.name)
                except NotFound:
                    pass
            token = UPLOAD_PREPAID.set(prepaid)
            try:
                await self.dest.save(work.name, data)
            finally:
                UPLOAD_PREPAID.reset(token)
            size = len(data)
        del data
        s.objects_sent += 1
        s.bytes_sent += size
        if action == REPLACE:
            s.objects_repaired += 1
            log.info("migrate.repaired", name=work.name, bytes=size)
        log.debug("migrate.sent", name=work.name, bytes=size)
        # config is tiny and is what makes the destination a repository: always read back.
        if work.name == "config" or self._sampled():
            await self._read_back(work.name, digest)

    async def _intact(self, work: Work) -> bool:
        """Whether a present object reads back as its name says (``CHECK``)."""
        try:
            data = await self.dest.load(work.name)
        except NotFound:
            return False
        with self.stats.held.holding(len(data)):
            ok = await content_id(data) == hashed_name(work.name)
        self.stats.objects_verified += 1
        self.stats.bytes_verified += work.size
        if not ok:
            log.warning("migrate.corrupt_in_destination", name=work.name)
        return ok

    async def _read_back(self, name: str, digest: str) -> None:
        data = await self.dest.load(name)
        with self.stats.held.holding(len(data)):
            ok = await content_id(data) == digest
        self.stats.objects_verified += 1
        self.stats.bytes_verified += len(data)
        if not ok:
            self._problem(name, "reads back from the destination differently from what was sent")

    def _problem(self, name: str, problem: str) -> None:
        self.stats.errors.append((name, problem))
        log.error("migrate.object_failed", name=name, error=problem)
        self.report(name, problem)

    async def _delete(self) -> None:
        """Remove what the destination has and the source lacks (after all else)."""
        s = self.stats
        for prefix in await self._delete_prefixes():
            mine = {object_key(name) async for name, _ in self._list(self.source, prefix)}
            extra = [(n, size) async for n, size in self._list(self.dest, prefix)]
            extra = [(n, size) for n, size in extra if object_key(n) not in mine]
            del mine
            for name, size in extra:
                if self.options.dry_run:
                    log.info("migrate.would_delete", name=name, bytes=size)
                else:
                    try:
                        await self.dest.remove(name)
                    except NotFound:
                        continue
                    log.info("migrate.deleted", name=name, bytes=size)
                s.objects_deleted += 1
                s.bytes_deleted += size

    async def _delete_prefixes(self) -> tuple[str, ...]:
        """``DELETE_ORDER``, with ``data/`` whole when both sides hold few packs."""
        limit = self.options.whole_listing
        for backend in (self.source, self.dest):
            if await listing_up_to(backend, "data/", limit) is None:
                return DELETE_ORDER
        return ("snapshots/", "index/", "data/", "keys/")


async def _nothing(_item: Any) -> None:
    pass
