"""Scores of rollouts: reward settings resolved to functions, and the scorer that applies them.

A reward function scores one rollout of one sample: ``reward(sample, rollout) -> float``,
sync or async. ``None`` means: the server's ground-truth rewards for point and detect
(the sample's ground truth is sent with the request), and normalized exact match against
the accepted answers for query, which the API does not score.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from lightning_moondream import rewards as reward_functions
from lightning_moondream.api.models import (
    AnyRequest,
    GroundTruth,
    Rollout,
    RolloutsResponse,
    Settings,
)

RewardFunction = Callable[[Any, Rollout], float | Awaitable[float]]
RewardSpec = str | Mapping[str, float] | RewardFunction | None


class Sample(Protocol):
    """What the module needs of a sample (``DetectSample``, ``PointSample``, ``QuerySample``)."""

    skill: str
    id: str

    @property
    def label(self) -> str:
        """The object phrase or question."""

    def to_request(self, settings: Settings | None = None) -> AnyRequest:
        """The request to send."""

    def ground_truth(self) -> GroundTruth | None:
        """Ground truth for the server (point and detect), else ``None``."""

    def target(self) -> dict[str, Any]:
        """The truth as JSON for metrics and client-side rewards."""

    def sft_group(self, settings: Settings | None = None) -> dict[str, Any]:
        """A supervised train step group teaching the sample's ground truth."""


def _answers_reward(function: Callable[[str | None, Sequence[str]], float]) -> RewardFunction:
    def reward(sample: Any, rollout: Rollout) -> float:
        answers = sample.target().get("answers")
        if answers is None:
            raise ValueError(
                f"sample {sample.id!r} ({sample.skill}) has no accepted answers for "
                f"{function.__name__}; that reward scores query samples"
            )
        return function(rollout.answer, answers)

    reward.__name__ = function.__name__
    return reward


def ground_truth(sample: Any, rollout: Rollout) -> float:
    """Client-side ground-truth reward: the local service's formulas, for any skill.

    Point and detect use the matching rewards of ``lightning_moondream.rewards``; query
    uses normalized exact match against the accepted answers.
    """
    if sample.skill == "query":
        return reward_functions.exact_match(rollout.answer, sample.target()["answers"])
    return reward_functions.ground_truth_reward(sample.skill, rollout.output, sample.target())


BUILTIN_REWARDS: dict[str, RewardFunction] = {
    "ground_truth": ground_truth,
    **{
        name: _answers_reward(function) for name, function in reward_functions.QUERY_REWARDS.items()
    },
}
"""Reward functions known by name in configs."""


def resolve_reward(spec: RewardSpec) -> RewardFunction | None:
    """Resolve a reward setting to a function, or ``None`` for server ground truth.

    Args:
        spec: ``None``; a built-in name (``ground_truth``, ``exact_match``, ``token_f1``,
            ``contains``); a dotted path ``package.module.function``; a mapping of names
            or dotted paths to weights (their weighted mean); or a callable.

    Raises:
        ValueError: If a name or path cannot be resolved to a callable.
    """
    if spec is None:
        return None
    if callable(spec):
        return spec
    if isinstance(spec, Mapping):
        return _weighted([(_named_reward(name), float(weight)) for name, weight in spec.items()])
    if isinstance(spec, str):
        return _named_reward(spec)
    raise ValueError(
        f"reward must be None, a name, a dotted path, weights or a callable, got {spec!r}"
    )


def _named_reward(spec: str) -> RewardFunction:
    """A built-in reward by name, or a function by dotted path."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, _, attribute = spec.rpartition(".")
    if not module_name:
        raise ValueError(
            f"reward {spec!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) "
            "nor a dotted path package.module.function"
        )
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward {spec!r} cannot be imported: {exc}") from exc
    if not callable(function):
        raise ValueError(f"reward {spec!r} is not callable")
    return function


def _weighted(components: list[tuple[RewardFunction, float]]) -> RewardFunction:
    if not components or any(weight <= 0 for _, weight in components):
        raise ValueError(
            "a weighted reward needs at least one function, each with a positive weight"
        )
    total = sum(weight for _, weight in components)

    async def weighted(sample: Any, rollout: Rollout) -> float:
        scores = [await _call(function, sample, rollout) for function, _ in components]
        return (
            sum(score * weight for score, (_, weight) in zip(scores, components, strict=True))
            / total
        )

    return weighted


async def _call(function: RewardFunction, sample: Any, rollout: Rollout) -> float:
    value = function(sample, rollout)
    if inspect.isawaitable(value):
        value = await value
    return value


class Scorer:
    """Scores the rollouts of a sample with the server's rewards or a reward function."""

    def __init__(self, spec: RewardSpec = None) -> None:
        self.function = resolve_reward(spec)
        self.name = getattr(self.function, "__name__", "server ground truth")

    def sends_ground_truth(self, sample: Sample) -> bool:
        """Whether the sample's ground truth goes to the server to be scored there."""
        return self.function is None and sample.skill in ("point", "detect")

    async def score(self, sample: Sample, response: RolloutsResponse) -> list[float]:
        """One finite reward per rollout of ``response``, in order.

        Raises:
            ValueError: Naming the sample, if a reward is missing or not a finite number.
        """
        if self.function is None:
            if response.rewards is not None:
                return response.rewards
            function: RewardFunction = ground_truth
        else:
            function = self.function
        values = await asyncio.gather(
            *(_call(function, sample, rollout) for rollout in response.rollouts)
        )
        checked = []
        for index, value in enumerate(values):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ValueError(
                    f"reward {self.name!r} gave {value!r} for rollout {index} of sample "
                    f"{sample.id!r}; a reward must be a finite number"
                )
            checked.append(float(value))
        return checked
