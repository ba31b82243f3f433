"""A token bucket in bytes per second, shared by any number of tasks."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from .metrics import note_throttled

Clock = Callable[[], float]

#: Default burst, in seconds of traffic at the configured rate. Small, so that no
#: second on the wire carries more than ~5% above the limit (bench/latency.py).
BURST_SECONDS = 0.05
#: Smallest default burst: a few socket writes, so slow limits stay smooth.
MIN_BURST = 64 * 1024
# Float slack (bytes) when comparing cumulative counters that grow large.
_EPSILON = 0.5


class Throttle:
    """Limit the bytes that pass per second, with a bounded burst.

    ``rate`` is bytes per second; ``None`` or ``0`` means unlimited (as
    restic's ``--limit-upload 0``), where :meth:`acquire` returns at once.
    ``burst`` is how many unused bytes may accumulate while idle (default: a
    twentieth of a second of traffic). Callers pay before they send: by time ``t``
    after a rate was set, at most ``burst + rate * t`` bytes have passed.
    Waiters are served in arrival order. ``clock`` defaults to anyio's
    loop clock, so tests can run on trio's virtual clock.
    """

    def __init__(
        self, rate: float | None, burst: int | None = None, *, clock: Clock | None = None
    ) -> None:
        self._clock = clock or anyio.current_time
        self._rate: float | None = None
        self._burst = 0.0
        # Cumulative byte counts: `_reserved` promised to callers so far;
        # `_credit` earned from the rate so far. A caller whose reservation
        # ends at P may go once `_credit >= P`.
        self._reserved = 0.0
        self._credit = 0.0
        self._last = 0.0
        self._changed = anyio.Event()
        self.set_rate(rate, burst)

    @property
    def rate(self) -> float | None:
        """Current rate in bytes per second, ``None`` when unlimited."""
        return self._rate

    @property
    def burst(self) -> float:
        """Current burst size in bytes (0 when unlimited)."""
        return self._burst

    @property
    def unlimited(self) -> bool:
        """True when no limit applies (callers may skip :meth:`acquire`)."""
        return self._rate is None

    def set_rate(self, rate: float | None, burst: int | None = None) -> None:
        """Change the limit while running; waiting tasks re-plan at once.

        Debt owed by waiting tasks carries over and is paid at the new rate;
        banked idle credit is cut down to the new burst.
        """
        if rate is not None and rate < 0:
            raise ValueError(f"rate must not be negative, got {rate}")
        was_unlimited = self._rate is None
        if not was_unlimited:
            self._refill()  # bank what the old rate earned up to now
        self._rate = float(rate) if rate else None
        if self._rate is None:
            self._burst = 0.0
            self._credit = self._reserved  # nobody owes anything when unlimited
        else:
            self._burst = float(burst if burst else max(self._rate * BURST_SECONDS, MIN_BURST))
            full = self._reserved + self._burst
            self._credit = full if was_unlimited else min(self._credit, full)
        self._last = self._clock()
        self._changed.set()
        self._changed = anyio.Event()

    def _refill(self) -> None:
        now = self._clock()
        if self._rate is not None:
            earned = self._credit + (now - self._last) * self._rate
            # Unused credit is capped at one burst: idle time does not bank.
            self._credit = min(earned, self._reserved + self._burst)
        self._last = now

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may pass. Costs nothing when unlimited."""
        if self._rate is None:
            return
        self._refill()
        self._reserved += nbytes
        position = self._reserved
        start = self._last
        try:
            while self._rate is not None and self._credit < position - _EPSILON:
                wait = (position - self._credit) / self._rate
                changed = self._changed
                with anyio.move_on_after(wait):
                    await changed.wait()
                self._refill()
        finally:
            # The stage running this (if any) counts the wait as throttled.
            note_throttled(self._clock() - start)
        if self._rate is None:
            return
        await anyio.lowlevel.checkpoint_if_cancelled()
