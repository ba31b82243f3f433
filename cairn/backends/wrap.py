"""The one place where the wrapper stack around a backend is assembled.

From the outside in::

    retry -> connection limit -> throttle -> logging -> fault injection -> backend

* retry is outermost so that each attempt queues for a connection afresh and a
  backoff wait holds no connection;
* throttle sits inside the limit: bandwidth is spent only by calls that are running;
* logging sees every attempt, so its counters are the real traffic;
* faults are injected right at the backend, where real failures come from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cairn.backends.base import Backend
from cairn.backends.faulty import Fault, FaultyBackend
from cairn.backends.limit import LimitedBackend
from cairn.backends.logged import LoggedBackend
from cairn.backends.retry import RetryBackend, RetryPolicy
from cairn.backends.throttle import RateLimiter, ThrottledBackend


def wrap_backend(
    backend: Backend,
    *,
    retries: RetryPolicy | int | None = None,
    connections: int | None = None,
    upload_limiter: RateLimiter | None = None,
    download_limiter: RateLimiter | None = None,
    log: Any = None,
    faults: Sequence[Fault] | str | None = None,
) -> Backend:
    """Stack the standard wrappers around ``backend``.

    ``retries``: a policy, a number of attempts, ``None`` for the default policy, or
    ``0``/``1`` for no retrying. ``connections``: overrides the backend's default.
    ``upload_limiter``/``download_limiter``: objects with ``async acquire(nbytes)``.
    ``log``: a structlog logger (default: ``cairn.backends``). ``faults``: a fault
    spec for tests; ``None`` leaves the fault wrapper out entirely.
    """
    stacked: Backend = backend
    if faults is not None:
        stacked = FaultyBackend(stacked, faults)
    stacked = LoggedBackend(stacked, log)
    if upload_limiter is not None or download_limiter is not None:
        stacked = ThrottledBackend(stacked, upload_limiter, download_limiter)
    stacked = LimitedBackend(stacked, connections)
    policy = RetryPolicy(attempts=retries) if isinstance(retries, int) else retries
    if policy is None or policy.max_attempts > 1:
        stacked = RetryBackend(stacked, policy)
    return stacked
