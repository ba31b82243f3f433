"""The per-stage table and bottleneck line of restore, ``check --read-data`` and
prune's repack.

``-v`` prints the table of the run's pipeline (:func:`~cairn.pipeline.format_stats`)
and one ``bottleneck:`` line; ``--json`` puts the same rows and the bottleneck in
the summary line. See docs/architecture.md, "Progress and metrics".
"""

from __future__ import annotations

from typing import Any

import click

from cairn.config.settings import Settings
from cairn.pipeline import (
    PipelineSnapshot,
    bottleneck,
    format_bottleneck,
    format_stats,
    stats_rows,
)


def summary_fields(snapshot: PipelineSnapshot | None) -> dict[str, Any]:
    """``stages`` (one row per stage) and ``bottleneck`` for the JSON summary;
    ``[]`` and ``null`` when the command ran no pipeline."""
    if snapshot is None:
        return {"stages": [], "bottleneck": None}
    stage, hint = bottleneck(snapshot)
    return {
        "stages": stats_rows(snapshot),
        "bottleneck": {"stage": stage, "hint": hint} if stage else None,
    }


def echo_table(settings: Settings, snapshot: PipelineSnapshot | None) -> None:
    """With ``-v`` (and not ``--json``), the table and the bottleneck line on stdout."""
    if snapshot is None or settings.verbosity <= 0 or settings.json:
        return
    click.echo(format_stats(snapshot))
    click.echo(format_bottleneck(snapshot))
