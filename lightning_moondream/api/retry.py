"""When to retry a failed request, and how long to wait first.

Pure functions of the call's kind, the attempt number and what happened, shared by the
synchronous and asynchronous clients so that both follow one policy:

- Safe calls (``GET``, ``DELETE`` and ``/rollouts``, whose sampling has no side effect)
  retry on connection errors, timeouts and 408, 425, 429, 500, 502, 503, 504.
- State-changing calls (``/train_step``, ``POST /adapters``, ``POST .../checkpoint``)
  carry no idempotency key, so they retry only where the server provably did not act:
  a connection that was never established, 429 and 503. Any other failure is
  ambiguous and is raised as such, never retried.

- A 429 changed nothing, so every call retries it; it is the service asking to slow
  down, not a failure, so it does not count against ``max_retries``: a call gives up
  for 429s alone only after waiting ``max_rate_limited_wait`` in all.

Waits are exponential backoff with full jitter (base 0.5 s, cap 30 s), unless the server
says how long to wait with ``Retry-After`` (seconds or an HTTP date).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import httpx

SAFE_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
STATE_CHANGING_RETRY_STATUSES = frozenset({429, 503})
MAX_RETRY_AFTER = 600.0
"""Longest ``Retry-After`` honoured, in seconds; a larger value is taken as this."""


_NOT_TRANSIENT = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)


class CallKind(enum.Enum):
    """Whether repeating a call is harmless."""

    SAFE = "safe"
    STATE_CHANGING = "state_changing"


def never_sent(error: httpx.RequestError) -> bool:
    """Tell whether a request failed before it could reach the server."""
    return isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


def should_retry_status(kind: CallKind, status_code: int) -> bool:
    """Tell whether an error status may be retried for a call of this kind."""
    allowed = SAFE_RETRY_STATUSES if kind is CallKind.SAFE else STATE_CHANGING_RETRY_STATUSES
    return status_code in allowed


def should_retry_transport(kind: CallKind, error: httpx.RequestError) -> bool:
    """Tell whether a failed request may be retried for a call of this kind.

    A request that this side built wrong (an unsupported scheme, a protocol misuse) or an
    answer that could not be read would fail the same way again.
    """
    if isinstance(error, _NOT_TRANSIENT) or not isinstance(error, httpx.TransportError):
        return False
    return kind is CallKind.SAFE or never_sent(error)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Read a ``Retry-After`` header: delay seconds or an HTTP date.

    Args:
        value: The header value, or ``None``.
        now: The current time (for HTTP dates); defaults to the clock.

    Returns:
        Seconds to wait (0 or more, at most ``MAX_RETRY_AFTER``), or ``None`` if the
        header is absent or unreadable.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


@dataclass
class RetryPolicy:
    """How many times to retry, and the backoff between attempts.

    Attributes:
        max_retries: Retries after the first attempt; 0 disables retrying (but for
            429s, which ``max_rate_limited_wait`` bounds).
        base_delay: Backoff of the first retry, in seconds, before jitter.
        max_delay: Cap of the backoff, in seconds, before jitter.
        max_rate_limited_wait: Seconds one call waits in all on 429s before giving up.
        rng: Source of jitter; seed it for repeatable waits.
    """

    max_retries: int = 4
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_rate_limited_wait: float = 1800.0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {self.max_retries}")

    def backoff(self, attempt: int) -> float:
        """Full-jitter wait before retry number ``attempt + 1`` (``attempt`` from 0)."""
        return self.rng.uniform(0.0, min(self.max_delay, self.base_delay * 2**attempt))

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Wait before the next attempt: the server's ``Retry-After`` if given, else backoff."""
        return retry_after if retry_after is not None else self.backoff(attempt)
