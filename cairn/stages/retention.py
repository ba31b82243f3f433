"""Deleting on storage that may refuse: S3 Object Lock retention.

On a bucket with Object Lock, cairn's s3 backend gives every object but locks a
retain-until date (``-o s3.object-lock=… -o s3.retention-days=N``). Until then
``forget`` and ``prune`` cannot delete it: they skip it, say so, and carry on. What
they skip stays consistent — a retained snapshot is still a snapshot (its data stays
in use), a retained old index is superseded by the new one, a retained pack is an
unindexed pack that a later prune removes once its retention has ended.
"""

from __future__ import annotations

import structlog

from cairn.backends.base import Backend, Retained

log = structlog.get_logger("cairn.retention")


async def remove_unless_retained(backend: Backend, name: str) -> Retained | None:
    """Remove ``name``; if storage retains it, leave it and return why (else None).
    ``NotFound`` and every other error propagate."""
    try:
        await backend.remove(name)
    except Retained as exc:
        log.warning("object.retained", name=name, until=exc.until)
        return exc
    return None
