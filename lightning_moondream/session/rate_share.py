"""One API key's configured request rate, shared by the processes of a run.

A service limits requests per key, not per process. With ``requests_per_second`` given,
rank 0 keeps the key's rate and grants every process an equal share of it, on staggered
turns (:class:`~lightning_moondream.api.limiter.Turns`), so that together they send as
one client would, evenly spaced, never two at once.

At each train step every process tells what its limiter knows (a :class:`Pace`, carried
by the step's existing gather) and rank 0 settles the key's rate for the next step:

- some process met a 429 since the last step: the rates the processes' limiters came
  down to, averaged and times the number of processes (never above the rate before);
- none did: additive increase, up to the configured rate: every process's share rises
  by ``INCREASE`` a step, as a limiter's own rate does after a run of successes.

Without a configured rate nothing is granted: each process's limiter takes its share of
the key's rate tier by itself (``RateLimiter.share``), on the same staggered turns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_moondream.api.limiter import INCREASE


@dataclass(frozen=True)
class Pace:
    """What one process's rate limiter knows at a train step.

    Attributes:
        rate: Requests per second it admits, ``None`` while nothing limits them.
        rate_limited: 429 answers the process has had so far.
    """

    rate: float | None
    rate_limited: int


class RateShare:
    """Rank 0's account of a configured key rate (see the module docstring).

    Args:
        requests_per_second: The key's configured rate; ``None`` grants nothing.
        processes: The run's processes.
    """

    def __init__(self, requests_per_second: float | None, processes: int) -> None:
        self.ceiling = requests_per_second
        self.key_rate = self.ceiling
        """The rate granted to the key's processes together; ``None``: none granted."""
        self._seen = [0] * processes

    def update(self, paces: Sequence[Pace]) -> float | None:
        """Settle the key's rate from every process's :class:`Pace`, in rank order."""
        if self.key_rate is None or self.ceiling is None:
            return None
        limited = any(
            pace.rate_limited > seen for pace, seen in zip(paces, self._seen, strict=True)
        )
        self._seen = [pace.rate_limited for pace in paces]
        known = [pace.rate for pace in paces if pace.rate is not None]
        if limited and known:
            learned = math.fsum(known) / len(known) * len(paces)
            self.key_rate = min(self.key_rate, learned)
        else:
            self.key_rate = min(self.key_rate + INCREASE * len(paces), self.ceiling)
        return self.key_rate
