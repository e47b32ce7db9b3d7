"""Plain results of the service's domain, before a dialect shapes them as JSON."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_moondream.server import codec
from lightning_moondream.server.engine import StepStats


@dataclass(frozen=True)
class SampledRollout:
    """One sampled answer to a request.

    Attributes:
        skill: The request's skill.
        tokens: Sampled answer tokens.
        logprobs: Their recorded log-probabilities.
        output: The decoded output in the spec's shape (detect boxes under ``boxes``).
        reasoning: ``{"text", "grounding", "tokens"}`` if the request asked for it.
        signature: HMAC binding the rollout to its adapter and request, for training;
            ``None`` for a read-only sample that can never be trained on.
    """

    skill: str
    tokens: list[int]
    logprobs: list[float]
    output: dict[str, Any]
    reasoning: dict[str, Any] | None = None
    signature: str | None = None

    @property
    def finish_reason(self) -> str:
        """``"stop"`` if the sequence ended on its end token, else ``"length"``."""
        end = codec.ANSWER_END if self.skill == "query" else codec.COORD_END
        return "stop" if self.tokens and self.tokens[-1] == end else "length"

    @property
    def coords(self) -> list[float]:
        """Normalized coordinates of a point or detect rollout (empty for query)."""
        return codec.coordinates(self.skill, self.tokens)


@dataclass(frozen=True)
class RolloutBatch:
    """The answer to ``/rollouts``: the rollouts, and rewards if ground truth was given."""

    rollouts: list[SampledRollout]
    rewards: list[float] | None


@dataclass(frozen=True)
class StepReport:
    """The answer to a train step.

    Attributes:
        step: Train steps of the adapter after this one.
        applied: Whether the step changed the adapter and was counted (not at lr 0).
        stats: The update's KL, gradient norm and SFT loss.
        reward_mean: Mean reward over the RL groups' rollouts (``None`` without any).
        reward_std: Their population standard deviation.
    """

    step: int
    applied: bool
    stats: StepStats
    reward_mean: float | None
    reward_std: float | None

    @classmethod
    def of(cls, step: int, applied: bool, stats: StepStats, rewards: Sequence[float]) -> StepReport:
        """The report of a step, with the mean and spread of its RL rewards."""
        if not rewards:
            return cls(step, applied, stats, None, None)
        return cls(step, applied, stats, statistics.fmean(rewards), statistics.pstdev(rewards))
