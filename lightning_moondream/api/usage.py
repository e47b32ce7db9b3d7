"""Counts of what a client sent and how long the server took, for logs and summaries."""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Iterable
from typing import Any

import numpy as np

LATENCY_WINDOW = 10_000
"""Latencies kept per endpoint for percentiles; older ones are dropped."""


class UsageStats:
    """Thread-safe counters of requests, retries, rollouts, train steps and bytes sent.

    Latency is the time of one attempt, from sending to the full answer, per endpoint
    (``POST /rollouts``, ``POST /train_step``, ...). ``rate_limited`` counts 429
    answers; ``admitted_rate`` is the rate (requests per second) the client's rate
    limiter admitted at its last answer, 0 while nothing limited it. Every field adds
    up across processes: summed, the admitted rates are the key's.
    """

    _COUNTERS: tuple[str, ...] = (
        "requests",
        "retries",
        "failures",
        "rate_limited",
        "rollouts",
        "train_steps",
        "images_sent",
        "bytes_sent",
        "admitted_rate",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0
        self.failures = 0
        self.rate_limited = 0
        self.rollouts = 0
        self.train_steps = 0
        self.images_sent = 0
        self.bytes_sent = 0
        self.admitted_rate = 0.0
        self._latency: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=LATENCY_WINDOW))

    def state(self) -> dict[str, Any]:
        """Every counter and latency as plain data, to send to another process."""
        with self._lock:
            state: dict[str, Any] = {name: getattr(self, name) for name in self._COUNTERS}
            state["latency"] = {name: list(values) for name, values in self._latency.items()}
        return state

    @classmethod
    def combined(cls, states: Iterable[dict[str, Any]]) -> UsageStats:
        """The usage of several clients (e.g. every process of a run) as one."""
        total = cls()
        for state in states:
            for name in cls._COUNTERS:
                # A state from before a field existed counts as none of it.
                setattr(total, name, getattr(total, name) + state.get(name, 0))
            for endpoint, values in state["latency"].items():
                total._latency[endpoint].extend(values)
        return total

    def __getstate__(self) -> dict[str, Any]:
        # A lock does not pickle: a module spawned into new processes carries its usage.
        return self.state()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(self.combined([state]).__dict__)

    def record_attempt(self, endpoint: str, seconds: float, bytes_sent: int) -> None:
        """Count one attempt of a request and its latency."""
        with self._lock:
            self.requests += 1
            self.bytes_sent += bytes_sent
            self._latency[endpoint].append(seconds)

    def record_retry(self) -> None:
        """Count one retry."""
        with self._lock:
            self.retries += 1

    def record_rate_limited(self) -> None:
        """Count one 429 answer."""
        with self._lock:
            self.rate_limited += 1

    def record_admitted_rate(self, rate: float | None) -> None:
        """Note the rate the limiter admits now; ``None``: nothing limits it."""
        with self._lock:
            self.admitted_rate = rate or 0.0

    def record_failure(self) -> None:
        """Count one request that failed for good."""
        with self._lock:
            self.failures += 1

    def record_success(self, *, rollouts: int = 0, train_steps: int = 0, images: int = 0) -> None:
        """Count what a successful request produced or sent."""
        with self._lock:
            self.rollouts += rollouts
            self.train_steps += train_steps
            self.images_sent += images

    def latencies(self, endpoint: str | None = None) -> list[float]:
        """Latencies in seconds of one endpoint, or of all of them."""
        with self._lock:
            if endpoint is not None:
                return list(self._latency.get(endpoint, ()))
            return [value for values in self._latency.values() for value in values]

    def snapshot(self) -> dict[str, float | int]:
        """Every counter, plus latency percentiles overall and per main endpoint."""
        with self._lock:
            counts: dict[str, float | int] = {name: getattr(self, name) for name in self._COUNTERS}
            series = {name: list(values) for name, values in self._latency.items()}
        every = [value for values in series.values() for value in values]
        counts.update(_percentiles("latency", every))
        for endpoint, prefix in (
            ("POST /rollouts", "rollouts"),
            ("POST /train_step", "train_step"),
        ):
            counts.update(_percentiles(f"{prefix}_latency", series.get(endpoint, [])))
        return counts


def _percentiles(prefix: str, values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p95 = np.percentile(np.asarray(values), [50, 95])
    return {f"{prefix}_p50_s": float(p50), f"{prefix}_p95_s": float(p95)}
