"""cairn's engine: stages over bounded channels, a process pool fed through
shared memory, a token-bucket throttle, progress metrics and clean cancellation.

It knows nothing about backups and imports nothing else from cairn.
See docs/architecture.md, "Pipeline engine".
"""

from .engine import Engine, open_engine
from .errors import (
    EXIT_INTERRUPTED,
    Interrupted,
    PipelineError,
    RemoteError,
    StageError,
    WorkerCrashed,
    exit_code_for,
    raising_causes,
)
from .memory import HeldBytes
from .metrics import (
    PipelineSnapshot,
    StageSnapshot,
    bottleneck,
    format_bottleneck,
    format_stats,
    stats_rows,
    waiting_on_output,
)
from .options import PipelineOptions
from .pipeline import Inlet, Pipeline
from .shm import Slot, SlotPool, SlotRef, SlotWriter
from .signals import stop_on_signals
from .throttle import Throttle
from .workers import WorkerPool

__all__ = [
    "EXIT_INTERRUPTED",
    "Engine",
    "HeldBytes",
    "Inlet",
    "Interrupted",
    "Pipeline",
    "PipelineError",
    "PipelineOptions",
    "PipelineSnapshot",
    "RemoteError",
    "Slot",
    "SlotPool",
    "SlotRef",
    "SlotWriter",
    "StageError",
    "StageSnapshot",
    "Throttle",
    "WorkerCrashed",
    "WorkerPool",
    "bottleneck",
    "exit_code_for",
    "format_bottleneck",
    "format_stats",
    "open_engine",
    "raising_causes",
    "stats_rows",
    "stop_on_signals",
    "waiting_on_output",
]
