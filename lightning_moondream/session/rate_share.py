"""One API key's request rate, shared by the processes of a run.

A service limits requests per key, not per process. Rank 0 keeps the key's rate and
grants every process an equal share of it, on staggered turns: process ``r`` of ``n``
sends at the wall-clock instants ``(r + k n) / pace``, so together they send as one
client would, evenly spaced, never two at once. The pace is the rate times the
``HEADROOM`` that the key's shared rate limiters keep.

The key's rate starts at the configured ``requests_per_second``, or unknown (nothing
limits requests) until a process meets a 429. At each train step every process tells
what its limiter knows (a :class:`Pace`, carried by the step's existing gather) and
rank 0 settles the key's rate for the next step:

- some process met a 429 since the last step: the rates the processes' limiters came
  down to, averaged and times the number of processes (never above the rate before);
- none did: additive increase, up to the configured rate: every process's share rises
  by ``INCREASE`` a step, as a limiter's own rate does after a run of successes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_moondream.api.limiter import HEADROOM, INCREASE


@dataclass(frozen=True)
class Pace:
    """What one process's rate limiter knows at a train step.

    Attributes:
        rate: Requests per second it admits, ``None`` while nothing limits them.
        rate_limited: 429 answers the process has had so far.
    """

    rate: float | None
    rate_limited: int


@dataclass(frozen=True)
class Turns:
    """A process's share of a key's rate: when it may send.

    Attributes:
        rate: Requests per second of this process.
        phase: Its first turn on the limiter's clock; the others follow every
            ``1 / (rate x HEADROOM)`` seconds. ``None`` for a process alone: no other
            process's turns to keep clear of.
    """

    rate: float
    phase: float | None

    @classmethod
    def of(cls, key_rate: float, rank: int, processes: int) -> Turns:
        """Rank ``rank``'s turns of ``processes`` sharing ``key_rate``.

        The phase is set on the wall clock, which every process (on every host kept in
        time) agrees on, and given on the monotonic clock the limiter paces by.
        """
        if processes == 1:
            return cls(key_rate, None)
        pace = key_rate * HEADROOM
        wall_to_monotonic = time.monotonic() - time.time()
        phase = (rank / pace + wall_to_monotonic) % (processes / pace)
        return cls(key_rate / processes, phase)


class RateShare:
    """Rank 0's account of a key's rate (see the module docstring).

    Args:
        requests_per_second: The key's configured rate, ``None`` to learn it from 429s.
        processes: The run's processes.
    """

    def __init__(self, requests_per_second: float | None, processes: int) -> None:
        self.ceiling = requests_per_second
        self.key_rate = self.ceiling
        """The rate granted to the key's processes together; ``None``: no limit yet."""
        self._seen = [0] * processes

    def update(self, paces: Sequence[Pace]) -> float | None:
        """Settle the key's rate from every process's :class:`Pace`, in rank order."""
        limited = any(
            pace.rate_limited > seen for pace, seen in zip(paces, self._seen, strict=True)
        )
        self._seen = [pace.rate_limited for pace in paces]
        known = [pace.rate for pace in paces if pace.rate is not None]
        if limited and known:
            learned = math.fsum(known) / len(known) * len(paces)
            self.key_rate = learned if self.key_rate is None else min(self.key_rate, learned)
        elif self.key_rate is not None:
            raised = self.key_rate + INCREASE * len(paces)
            self.key_rate = raised if self.ceiling is None else min(raised, self.ceiling)
        return self.key_rate
