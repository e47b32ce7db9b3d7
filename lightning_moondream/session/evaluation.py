"""The one evaluation loop: a greedy answer per sample, scored, into metrics.

The module's validation and test, :func:`lightning_moondream.evaluation.evaluate_async`
and ``BenchmarkWatch`` all evaluate through :class:`EvaluationLoop`. What answers is a
:data:`~lightning_moondream.session.sampling.GreedyModel`, so any way of answering (an
adapter of the tuning API today) plugs in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lightning_moondream.metrics import SkillMetrics
from lightning_moondream.scoring import Sample, Scorer
from lightning_moondream.session.sampling import GreedyModel


@dataclass(frozen=True)
class Scored:
    """One sample's greedy answer and its reward.

    Attributes:
        index: The sample's position among every sample the loop has seen.
        sample: The sample.
        output: The answer's ``output`` JSON.
        reward: Its reward.
    """

    index: int
    sample: Sample
    output: dict[str, Any]
    reward: float

    def record(self) -> dict[str, Any]:
        """``{"sample", "output", "reward"}``, as validation and test steps return them."""
        return {"sample": self.sample, "output": self.output, "reward": self.reward}


class Tally(Protocol):
    """A further score kept over the loop's answers, such as a benchmark's metric."""

    def update(self, scored: Scored) -> None:
        """Take in one answer."""
        ...


class BenchmarkTally:
    """A benchmark's metric (``dataset.benchmark.metric()``) kept over the loop's answers.

    Args:
        metric: The benchmark's metric, updated with ``(output, target, group, label,
            image_size)``.
        group: The group (e.g. the image) of the loop's ``index``-th sample.
    """

    def __init__(self, metric: Any, group: Callable[[int], Any]) -> None:
        self.metric = metric
        self.group = group

    def update(self, scored: Scored) -> None:
        """Score one answer the benchmark's way."""
        sample = scored.sample
        self.metric.update(
            scored.output,
            sample.target(),
            self.group(scored.index),
            sample.label,
            getattr(sample, "image_size", None),
        )

    def compute(self) -> dict[str, float]:
        """The benchmark's scores (combined over processes by torchmetrics)."""
        return {name: float(value) for name, value in self.metric.compute().items()}


class EvaluationLoop:
    """Answers batches with a model, scores every answer and keeps the metrics.

    Args:
        model: Answers each sample with one greedy response.
        scorer: Scores an answer where the response brings no reward.
        metrics: Where the skills' metrics are kept (a fresh ``SkillMetrics`` if ``None``).
        tallies: Further scores to keep.
    """

    def __init__(
        self,
        model: GreedyModel,
        scorer: Scorer,
        metrics: SkillMetrics | None = None,
        tallies: Sequence[Tally] = (),
    ) -> None:
        self.model = model
        self.scorer = scorer
        self.metrics = metrics if metrics is not None else SkillMetrics()
        self.tallies = list(tallies)
        self.rewards: list[float] = []
        """Every answer's reward so far, in order."""

    async def answer(self, samples: Sequence[Sample]) -> list[Scored]:
        """Answer and score one batch, adding it to the metrics and tallies."""
        responses = await self.model(samples)
        scored = []
        for sample, response in zip(samples, responses, strict=True):
            [reward, *_] = await self.scorer.score(sample, response)
            output = dict(response.rollouts[0].output)
            item = Scored(len(self.rewards), sample, output, reward)
            self.rewards.append(reward)
            self.metrics.update(
                sample.skill,
                output,
                sample.target(),
                getattr(sample, "image_size", None),
                sample.label,
            )
            for tally in self.tallies:
                tally.update(item)
            scored.append(item)
        return scored

    def results(
        self, all_gather: Callable[[tuple[float, int]], list[tuple[float, int]]] | None = None
    ) -> dict[str, float]:
        """The metrics, the mean ``reward`` and the number of ``samples``.

        Args:
            all_gather: Gives every process's ``(sum of rewards, count)``, so the results
                cover every process (as torchmetrics totals the metrics); ``None`` for
                this process alone.
        """
        values = {name: float(value) for name, value in self.metrics.compute().items()}
        share = (math.fsum(self.rewards), len(self.rewards))
        shares = all_gather(share) if all_gather is not None else [share]
        total, count = math.fsum(item[0] for item in shares), sum(item[1] for item in shares)
        if count:
            values["reward"] = total / count
        values["samples"] = float(count)
        return values
