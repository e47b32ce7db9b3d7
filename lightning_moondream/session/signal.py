"""Requests that teach: prompts skipped before sampling, and steps topped up after it.

A group teaches only if its rewards spread: when every rollout of a prompt scores
alike (always solved, or never), its advantages are all zero and the train step learns
nothing from it, yet its ``/rollouts`` request cost as much as any other. Under a
request limit (Moondream Cloud admits 2 requests/s per key, 10 once funded) such
requests are the waste to cut.

**Pre-rollout filtering** (after GRESO, "Act Only When It Pays", Zheng et al. 2025):
a prompt's recent groups predict its next one. :class:`PromptFilter` counts, per
prompt, the groups in a row that had no spread (``streak``), and skips the prompt
ahead of sampling with probability ``min(1 - floor, 1 - base ** streak)``: 0 for a
prompt that taught last time, 0.5 after one flat group, 0.75 after two, and so on,
capped so that a prompt is still sampled with probability ``floor`` at least. A
prompt that is sampled again and spreads goes back to a streak of 0, and is never
skipped until it goes flat again; a skipped prompt keeps its streak. GRESO also tunes
``base`` online toward a target share of flat groups; here it is fixed, so that a
run's skips depend only on its rewards and its seed.

Each skip is drawn from a hash of the seed, the prompt and the global step, not from
a random stream: the same run skips the same prompts whatever the order of its
batches, and every process of a multi-process run, holding the same history, draws
the same.

**Dynamic sampling** (after DAPO, Yu et al. 2025) draws more until a step holds as many
groups with spread as its batch had prompts. Lightning gives ``training_step`` one
batch, so no prompt beyond it can be drawn without taking it from a later step (and
from the data loader's count of the epoch). The prompts of the batch that spread are
sampled again instead (:func:`resampled`): they are the ones most likely to spread
again, and each further request is a fresh group of the same prompt under the same
policy, so the step stays on-policy. Extra requests per step are bounded.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_moondream.api import RolloutsResponse
from lightning_moondream.scoring import Sample
from lightning_moondream.session.remote_step import spread

DEFAULT_BASE = 0.5
"""Each flat group in a row multiplies a prompt's chance of being sampled by this."""

DEFAULT_FLOOR = 0.1
"""The least chance that a prompt with flat groups is sampled again."""


def prompt_key(sample: Sample) -> str:
    """What identifies a prompt across epochs: its skill, id and label (phrase or question).

    A sample without an id is known by a digest of its image as sent (a data URL, once
    encoded) instead, so that samples asking the same of different images keep apart.
    """
    identity = sample.id
    image = getattr(sample, "image", None)
    if not identity and isinstance(image, str):
        identity = hashlib.blake2b(image.encode(), digest_size=16).hexdigest()
    return f"{sample.skill}\x1f{identity}\x1f{sample.label}"


@dataclass(frozen=True)
class SkipRule:
    """The chance of skipping a prompt after flat groups in a row.

    Args:
        base: Each flat group in a row multiplies the chance of sampling by this (0 to 1).
        floor: The least chance of sampling a prompt, however flat (0 to 1), so a prompt
            that would spread now is still found.
    """

    base: float = DEFAULT_BASE
    floor: float = DEFAULT_FLOOR

    def probability(self, streak: int) -> float:
        """The chance of skipping a prompt whose last ``streak`` groups had no spread."""
        return min(1.0 - self.floor, 1.0 - self.base**streak)


class PromptFilter:
    """Skips prompts whose recent groups had no reward spread, ahead of sampling.

    Args:
        rule: The chance of skipping after flat groups in a row.
        seed: Seeds every draw; the same seed and history skip the same prompts.
    """

    def __init__(self, rule: SkipRule | None = None, seed: int = 0) -> None:
        self.rule = rule or SkipRule()
        self.seed = seed
        self._streaks: dict[str, int] = {}

    def streak(self, sample: Sample) -> int:
        """Flat groups in a row of the sample's prompt, as last sampled (0 if unseen)."""
        return self._streaks.get(prompt_key(sample), 0)

    def select(self, samples: Sequence[Sample], step: int) -> list[Sample]:
        """The samples to sample at ``step``, in order; the others are skipped."""
        return [
            sample
            for sample in samples
            if self._draw(prompt_key(sample), step) >= self.rule.probability(self.streak(sample))
        ]

    def record(self, outcomes: Iterable[tuple[str, bool]]) -> None:
        """Count groups sampled: ``(prompt_key, spread)`` pairs, in the order they came.

        A group with spread sets its prompt's streak back to 0 (forgotten); a flat one
        adds 1.
        """
        for key, spreads in outcomes:
            if spreads:
                self._streaks.pop(key, None)
            else:
                self._streaks[key] = self._streaks.get(key, 0) + 1

    def state(self) -> dict[str, int]:
        """The flat streaks, for a checkpoint: a resumed run skips as this one would."""
        return dict(self._streaks)

    def restore(self, streaks: Mapping[str, int]) -> None:
        """Take up the flat streaks of a checkpoint (see :meth:`state`)."""
        self._streaks = {str(key): int(count) for key, count in streaks.items()}

    def _draw(self, key: str, step: int) -> float:
        """A uniform number in [0, 1) fixed by the seed, the step and the prompt."""
        digest = hashlib.blake2b(f"{self.seed}\x1f{step}\x1f{key}".encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "big") / 2**64


def resampled(taught: Sequence[Sample], missing: int, budget: int) -> list[Sample]:
    """The prompts to sample again for a step short of ``missing`` groups with spread.

    Prompts that just spread are taken in turn (again from the first when each has
    been taken), as many as are missing and ``budget`` allows; none if none spread.
    """
    count = max(0, min(missing, budget)) if taught else 0
    return list(itertools.islice(itertools.cycle(taught), count))


@dataclass
class Harvest:
    """What a step's ``/rollouts`` requests brought, wave after wave.

    Attributes:
        groups: Train step groups of the prompts whose rewards spread.
        rewards: Every request's rewards, in order.
        outcomes: ``(prompt_key, spread)`` of every request, for :meth:`PromptFilter.record`.
        extra_requests: Requests beyond the batch's own (dynamic sampling).
    """

    groups: list[Any] = field(default_factory=list)
    rewards: list[list[float]] = field(default_factory=list)
    outcomes: list[tuple[str, bool]] = field(default_factory=list)
    extra_requests: int = 0

    def add(
        self,
        samples: Sequence[Sample],
        scored: Sequence[tuple[RolloutsResponse, list[float]]],
        min_spread: float,
    ) -> list[Sample]:
        """Take in one wave of scored requests; the samples whose rewards spread.

        Args:
            samples: The wave's samples, in the order of ``scored``.
            scored: Each request's response and rewards.
            min_spread: Groups whose reward standard deviation is below this teach nothing.
        """
        taught = []
        for sample, (response, rewards) in zip(samples, scored, strict=True):
            spreads = len(rewards) > 1 and spread(rewards) >= min_spread
            self.rewards.append(rewards)
            self.outcomes.append((prompt_key(sample), spreads))
            if spreads:
                self.groups.append(response.to_group(rewards))
                taught.append(sample)
        return taught
