"""Pacing requests to the rate a service admits for one API key.

Moondream Cloud admits 2 requests per second per key (10 once funded) and answers 429
above it. What limits a run there is that rate, not latency, and the rate belongs to
the key, not to a client: every client of one key in a process shares one
``RateLimiter`` (``limiter_for``), and a multi-process run can grant each process a
share of it (``set_rate``).

The limiter is a token bucket of one token: requests start at most ``rate`` per second,
one every ``1 / rate`` seconds. How many are in flight then follows from Little's law
(in flight = admitted rate x latency), so concurrency needs no limit of its own beyond
the caller's ``max_concurrency``.

The rate is configured (``requests_per_second``) or, unset, found by AIMD:

- no limit until the first 429, then the rate the client was sending at;
- on a 429, multiplicative decrease (x ``DECREASE``), once per congestion event (a 429
  of a request sent before the last decrease is the same event), but never below the
  rate the service admitted over the last seconds, which it provably accepts, nor below
  ``MIN_RATE``; a ``Retry-After`` pauses every request of the key that long, and a
  ``Retry-After: 0`` (retry at once) asks for no slowing down, so it changes no rate;
- after a run of successes (about one second's worth), additive increase
  (``INCREASE`` requests per second), up to the configured or granted rate.

The limiter only computes waits on its clock; the client sleeps them, so both clock and
sleep are injectable and tests run on a fake clock with no real waiting.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import SecretStr

DECREASE = 0.5
"""Factor applied to the rate on a 429."""
INCREASE = 0.5
"""Requests per second added after a run of successes."""
MIN_RATE = 0.1
"""Requests per second the rate never goes below."""
MIN_SUCCESS_RUN = 4
"""Fewest successes in a row before an increase (at least one second's worth)."""
WINDOW = 2.0
"""Seconds over which the send rate and the admitted rate are measured."""


@dataclass(frozen=True)
class Reservation:
    """A request's turn: how long to wait first, and when (on the limiter's clock)."""

    wait: float
    at: float


def _check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise ValueError(f"requests_per_second must be a number > 0, got {rate!r}")
    if not math.isfinite(rate):
        raise ValueError(f"requests_per_second must be finite, got {rate!r}")
    return float(rate)


class RateLimiter:
    """The pace of one API key at one service, shared by its clients in a process.

    Thread-safe; waits are computed, never slept here.

    Args:
        requests_per_second: The rate to start at and never exceed; ``None`` to find it
            (no limit until the first 429).
        clock: Seconds on a monotonic clock.
    """

    def __init__(
        self,
        requests_per_second: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._rate = None if requests_per_second is None else _check_rate(requests_per_second)
        self._ceiling = self._rate
        self._phase: float | None = None
        self._next_slot = -math.inf
        self._paused_until = -math.inf
        self._last_decrease = -math.inf
        self._run = 0
        self._sent: deque[float] = deque()
        self._admitted: deque[float] = deque()

    @property
    def rate(self) -> float | None:
        """Requests per second in force, or ``None`` while nothing limits them."""
        with self._lock:
            return self._rate

    def set_rate(self, requests_per_second: float, *, phase: float | None = None) -> None:
        """Set the rate and its ceiling from outside, e.g. this process's share of a key.

        Args:
            requests_per_second: The rate, and the most it may rise to.
            phase: Requests then start only at ``phase + k / requests_per_second`` on the
                limiter's clock (``k`` whole): processes sharing a key with staggered
                phases take turns, and never send in the same instant, which a service
                admitting a burst of one would refuse.

        Raises:
            ValueError: If the rate is not a finite number > 0.
        """
        rate = _check_rate(requests_per_second)
        with self._lock:
            self._rate = self._ceiling = rate
            self._phase = phase

    def reserve(self, delay: float = 0.0) -> Reservation:
        """Take the next turn to send, no sooner than ``delay`` seconds from now.

        A request that must wait anyway (a retry's backoff) is charged the earliest free
        turn, so its own wait never holds back the requests behind it.
        """
        with self._lock:
            now = self._clock()
            earliest = self._on_turn(max(now, self._paused_until, self._next_slot))
            if self._rate is not None:
                self._next_slot = earliest + 1.0 / self._rate
            wait = max(delay, earliest - now)
            self._sent.append(now + wait)
            self._trim(self._sent, now)
            return Reservation(wait, now + wait)

    def record_success(self) -> None:
        """Count an admitted request; a run of them raises the rate."""
        with self._lock:
            now = self._clock()
            self._admitted.append(now)
            self._trim(self._admitted, now)
            if self._rate is None:
                return
            self._run += 1
            if self._run >= max(MIN_SUCCESS_RUN, math.ceil(self._rate)):
                self._run = 0
                raised = self._rate + INCREASE
                self._rate = raised if self._ceiling is None else min(raised, self._ceiling)

    def record_rate_limited(self, sent_at: float, retry_after: float | None) -> None:
        """React to a 429 of a request sent at ``sent_at`` (on this clock)."""
        with self._lock:
            now = self._clock()
            self._run = 0
            if retry_after is not None:
                self._paused_until = max(self._paused_until, now + retry_after)
            if retry_after == 0 or sent_at < self._last_decrease:
                # Retry-After 0 asks for no slowing down; a request sent before the last
                # decrease was sent at the old rate, which that decrease answered.
                return
            current = self._rate if self._rate is not None else self._send_rate(now)
            if current is None:
                return  # too little seen to know a rate; the pause and backoff pace it
            floor = max(MIN_RATE, len(self._admitted) / WINDOW)
            self._rate = max(current * DECREASE, floor)
            if self._ceiling is not None:
                self._rate = min(self._rate, self._ceiling)
            self._last_decrease = now

    def _on_turn(self, moment: float) -> float:
        """The first of this limiter's turns at or after ``moment`` (any, without a phase)."""
        if self._phase is None or self._ceiling is None:
            return moment
        spacing = 1.0 / self._ceiling
        turns = math.ceil((moment - self._phase) / spacing - 1e-9)
        return self._phase + turns * spacing

    def _send_rate(self, now: float) -> float | None:
        self._trim(self._sent, now)
        span = max(self._sent, default=now) - min(self._sent, default=now)
        return (len(self._sent) - 1) / span if span > 0 else None

    @staticmethod
    def _trim(times: deque[float], now: float) -> None:
        while times and times[0] < now - WINDOW:
            times.popleft()


_shared: dict[tuple[str, str], RateLimiter] = {}
_shared_lock = threading.Lock()


def limiter_for(
    base_url: str, api_key: SecretStr, requests_per_second: float | None = None
) -> RateLimiter:
    """The process's one limiter of an API key at a service.

    The key is kept only as a digest. A rate given here sets the shared limiter's rate,
    for every client of the key.
    """
    digest = hashlib.sha256(api_key.get_secret_value().encode()).hexdigest()
    with _shared_lock:
        limiter = _shared.setdefault((base_url, digest), RateLimiter())
    if requests_per_second is not None:
        limiter.set_rate(requests_per_second)
    return limiter
