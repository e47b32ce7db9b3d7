"""The remote train step of each global step: gathered once, sent once, known to every rank.

Every rank adds what its batches taught (groups and reward statistics) as a
:class:`Shard`. At the optimizer step the shards of all ranks, and of all accumulated
batches, meet on rank 0, which sends one ``/train_step`` and shares its outcome with the
others, so every process agrees with the service about what was applied.

With ``max_staleness=1`` the step is sent and left to run while the next batches are
sampled; its outcome is learnt, and shared, at the next step. A step sent but not yet
known to be applied is *in doubt*: no checkpoint may pair ``global_step`` with the
adapter's state then.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol, TypeVar

from lightning_moondream.api import (
    AmbiguousRequestError,
    AsyncTuningClient,
    TrainStepResult,
    TuningAPIError,
)
from lightning_moondream.distributed import Collective
from lightning_moondream.session.rate_share import Pace

T = TypeVar("T")

SERVICE_STATISTICS = ("kl", "router_kl", "grad_norm", "sft_loss")
"""Train step statistics logged as ``train/<name>`` where the service reports them."""


class AmbiguousTrainStepError(RuntimeError):
    """A train step may or may not have been applied, and the server cannot tell which."""


class TrainStepFailedError(RuntimeError):
    """A train step failed on every attempt and is known not to have been applied."""


@dataclass
class Shard:
    """What one rank's batches of a global step bring to its train step.

    Attributes:
        groups: Train step groups (RL groups with reward spread, and SFT groups).
        rewards: Every rollout's reward, per sample (empty lists for SFT-only batches).
        sft_groups: How many of ``groups`` are SFT groups.
        rollout_seconds: Time spent sampling and scoring.
        counts: Further counts of the step (``skipped_prompts``, ``extra_requests``),
            summed over batches and ranks and logged as ``train/<name>``.
        pace: What the rank's rate limiter knows (the latest added), so that rank 0
            can share the key's rate anew.
    """

    groups: list[Any] = field(default_factory=list)
    rewards: list[list[float]] = field(default_factory=list)
    sft_groups: int = 0
    rollout_seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    pace: Pace | None = None

    def add(self, other: Shard) -> None:
        """Take in another batch's shard (gradient accumulation)."""
        self.groups += other.groups
        self.rewards += other.rewards
        self.sft_groups += other.sft_groups
        self.rollout_seconds += other.rollout_seconds
        for name, value in other.counts.items():
            self.counts[name] = self.counts.get(name, 0) + value
        self.pace = other.pace or self.pace


@dataclass(frozen=True)
class StepReport:
    """What every rank learns at a global step, the same on all of them.

    Attributes:
        train_steps: Train steps the adapter has, counting a step still in flight.
        skipped_steps: Global steps that applied nothing (no group had signal, or lr 0).
        metrics: ``train/...`` values to log for this step.
        key_rate: The API key's rate granted to the run's processes together for the
            next step; ``None`` while nothing limits it.
    """

    train_steps: int
    skipped_steps: int
    metrics: dict[str, float]
    key_rate: float | None = None


class TrainStepService(Protocol):
    """What the remote step needs of the service (rank 0 only): a ``Connection``."""

    @property
    def client(self) -> AsyncTuningClient:
        """The API client that sends train steps and reads the adapter back."""
        ...

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Start a coroutine on the client's event loop."""
        ...

    def rate_share(self, paces: list[Pace]) -> float | None:
        """The key's rate for the next step, from every rank's pace."""
        ...


def spread(values: Sequence[float]) -> float:
    """Population standard deviation in float arithmetic.

    ``statistics.pstdev`` computes in exact fractions, which costs milliseconds per batch
    on the path between the rollouts and the train step.
    """
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((value - mean) ** 2 for value in values) / len(values))


class RemoteStep:
    """The bookkeeping of remote train steps for one adapter.

    Every method that takes the run's collectives is called on every rank at once.

    Args:
        service: Sends train steps and reads step counts (used on rank 0 only).
        max_staleness: 0 waits for each step; 1 lets it run while the next batches sample.
        max_retries: Resends of a step known not to be applied.
        on_ambiguous_step: ``raise`` or ``skip`` when a step's outcome cannot be known.
        resume_hint: Names the checkpoint to resume from, for error messages.
    """

    def __init__(
        self,
        service: TrainStepService,
        *,
        max_staleness: int,
        max_retries: int,
        on_ambiguous_step: Literal["raise", "skip"],
        resume_hint: Callable[[], str],
    ) -> None:
        self.service = service
        self.steps_in_answers = False
        """Whether each train step's answer tells the adapter's step (``/finetunes``)."""
        self.max_staleness = max_staleness
        self.max_retries = max_retries
        self.on_ambiguous_step = on_ambiguous_step
        self.resume_hint = resume_hint
        self.train_steps = 0
        """Train steps the adapter has, as this run knows it."""
        self.skipped_steps = 0
        """Global steps of this run that applied nothing."""
        self.in_doubt = False
        """Whether a step was counted that the adapter may not have."""
        self._shard = Shard()
        self._pending: _Sent | None = None
        self._drained: TrainStepResult | None = None
        self._warned: set[str] = set()
        self._go_on_ahead: Callable[[str], None] | None = None

    def reset(
        self,
        train_steps: int,
        skipped_steps: int = 0,
        *,
        steps_in_answers: bool = False,
        go_on_ahead: Callable[[str], None] | None = None,
    ) -> None:
        """Start counting from an adapter's state, forgetting any unsent groups.

        Args:
            train_steps: Train steps the adapter has.
            skipped_steps: Global steps of the run so far that applied nothing.
            steps_in_answers: Whether the service tells the adapter's step in each
                train step's answer (``/finetunes``), so a step in doubt can count as
                applied until the next answer says.
            go_on_ahead: Given, the first answer may show the adapter past
                ``train_steps`` (a finetune resumed with ``resume_at_finetune_step`` on a
                service that does not report its step): the count goes on from there,
                said through it, instead of stopping the run.
        """
        self.train_steps, self.skipped_steps = train_steps, skipped_steps
        self.steps_in_answers = steps_in_answers
        self._go_on_ahead = go_on_ahead
        self.in_doubt = False
        self._shard = Shard()

    def add(self, shard: Shard) -> None:
        """Keep a batch's contribution for the next step."""
        self._shard.add(shard)

    def step(self, collective: Collective, adapter_id: str, lr: float | None) -> StepReport:
        """Send one train step with every rank's groups; call on every rank.

        Args:
            collective: The run's collectives.
            adapter_id: The adapter to train.
            lr: Learning rate to send; ``None`` for the service's default.

        Returns:
            The step's report, the same on every rank.
        """
        shard, self._shard = self._shard, Shard()
        shards = collective.gather(shard)
        report = collective.on_zero(partial(self._step_on_zero, adapter_id, lr, shards or []))
        self.train_steps, self.skipped_steps = report.train_steps, report.skipped_steps
        return report

    def _step_on_zero(self, adapter_id: str, lr: float | None, shards: list[Shard]) -> StepReport:
        metrics = _batch_metrics(shards)
        groups = [group for shard in shards for group in shard.groups]
        previous = self.settle() or self._drained
        self._drained = None
        if previous is not None:
            metrics.update(_service_metrics(previous))
        if not groups:
            self.skipped_steps += 1
            self._warn_skipped(sampled="reward_mean" in metrics)
        else:
            sent = time.perf_counter()
            applied_before, self.in_doubt = self.train_steps, True
            self.train_steps += 1
            future = self.service.submit(self._apply(adapter_id, groups, lr, applied_before))
            self._pending = _Sent(future, adapter_id, applied_before)
            if self.max_staleness == 0:
                result = self.settle()
                metrics["train_step_time_s"] = time.perf_counter() - sent
                if result is not None:
                    metrics.update(_service_metrics(result))
        metrics["skipped_steps"] = float(self.skipped_steps)
        paces = [shard.pace for shard in shards if shard.pace is not None]
        key_rate = self.service.rate_share(paces) if len(paces) == len(shards) else None
        metrics.update(_rate_metrics(paces))
        return StepReport(self.train_steps, self.skipped_steps, metrics, key_rate)

    def _warn_skipped(self, *, sampled: bool) -> None:
        """Say once per cause why a step sent nothing."""
        cause = "alike" if sampled else "all skipped"
        if cause in self._warned:
            return
        self._warned.add(cause)
        if sampled:
            message = (
                "a step's rollouts all scored alike, so there was nothing to learn from and no "
                "train step was sent (counted in train/skipped_steps); check the reward, or "
                "sample with more variety (temperature, num_rollouts)"
            )
        else:
            message = (
                "every prompt of a step was skipped, as their recent groups had no reward "
                "spread (skip_prompts), so no train step was sent (counted in "
                "train/skipped_steps and train/skipped_prompts); raise skip_floor (the least "
                "chance that such a prompt is still sampled) or turn skip_prompts off"
            )
        warnings.warn(message, stacklevel=3)

    def skipped_summary(self, global_steps: int) -> str | None:
        """The end-of-fit warning when most of a run's steps applied nothing, else ``None``.

        Args:
            global_steps: The run's global steps so far (applied plus skipped).
        """
        if global_steps <= 0 or 2 * self.skipped_steps <= global_steps:
            return None
        return (
            f"{self.skipped_steps} of {global_steps} train steps applied nothing "
            "(train/skipped_steps): in each, every sample's rollouts scored alike (no reward "
            "spread), so there was nothing to learn from and no train step was sent. Sample "
            "more variety (more num_rollouts, a higher train_settings temperature) or use more "
            "varied data (more samples, several objects per image, harder prompts)"
        )

    def drain(self, collective: Collective) -> None:
        """Wait for the step in flight, if any; call on every rank."""
        counts = collective.on_zero(self._settled_counts)
        self.train_steps, self.skipped_steps, self.in_doubt = counts

    def _settled_counts(self) -> tuple[int, int, bool]:
        # Its statistics are logged with the next step.
        self._drained = self.settle() or self._drained
        return self.train_steps, self.skipped_steps, self.in_doubt

    def abandon(self) -> None:
        """Stop waiting for a step in flight: it counts as in doubt."""
        pending, self._pending = self._pending, None
        if pending is not None and not pending.future.done():
            self.in_doubt = True

    def settle(self) -> TrainStepResult | None:
        """Wait for the pending step and count its outcome; its result, if one was pending.

        Counts change here, on the caller's thread only, never on the client's loop.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            result = pending.future.result()
        except (TuningAPIError, TrainStepFailedError):
            # Known not applied. Waited for, the global step is not counted either; with
            # max_staleness=1 it already was, so no checkpoint may pair the two counts.
            self.train_steps = pending.applied_before
            self.in_doubt = self.max_staleness == 1
            raise
        if result is not None:
            self._reconcile(pending.adapter_id, pending.applied_before + 1, result)
        self.in_doubt = False
        return result

    async def _apply(
        self, adapter_id: str, groups: list[Any], lr: float | None, applied_before: int
    ) -> TrainStepResult | None:
        """Send a counted step until it is known to be applied (or provably not).

        Runs on the client's loop: it reads the counts, and changes none.
        """
        for _ in range(self.max_retries + 1):
            try:
                return await self.service.client.train_step(adapter_id, groups, lr=lr)
            except AmbiguousRequestError as exc:
                if not await self._resend_needed(adapter_id, applied_before, exc):
                    return None
        raise TrainStepFailedError(
            f"train step {applied_before + 1} of adapter {adapter_id} failed on every "
            "attempt and was not applied"
        )

    def _reconcile(self, adapter_id: str, expected: int, result: TrainStepResult) -> None:
        """Follow the step count the service reports after a train step.

        A count below the expected one means steps that changed nothing (lr 0), or one
        in doubt that was counted as applied and was not: they count as skipped, so
        ``global_step`` still equals applied plus skipped steps. A count above it means
        someone else trained the adapter, which no count can repair.
        """
        reported = result.step
        if reported is None:
            if result.applied is False:
                reported = expected - 1
            else:
                return
        go_on_ahead, self._go_on_ahead = self._go_on_ahead, None
        if reported > expected and go_on_ahead is not None:
            go_on_ahead(
                f"finetune {adapter_id} answered this run's train step {expected} at step "
                f"{reported}: it had gone on past the checkpoint, so the count goes on from "
                f"step {reported} (resume_at_finetune_step); the steps it had stay applied"
            )
            self.train_steps = reported
            return
        if reported > expected:
            raise AmbiguousTrainStepError(
                f"adapter {adapter_id} reports step {reported} after this run's train step "
                f"{expected}: it was trained elsewhere (by another run, or past the checkpoint "
                "this run resumed from)"
            )
        self.skipped_steps += expected - reported
        self.train_steps = reported

    async def _resend_needed(
        self, adapter_id: str, applied_before: int, error: AmbiguousRequestError
    ) -> bool:
        """Read the adapter back to learn whether an ambiguous train step was applied."""
        reported = (await self.service.client.adapters.get(adapter_id)).train_steps
        step = applied_before + 1
        if reported == applied_before:
            warnings.warn(
                f"train step {step} was not applied ({error.cause.message}); resending it",
                stacklevel=2,
            )
            return True
        if reported == step:
            return False
        if reported is None and self.steps_in_answers:
            warnings.warn(
                f"train step {step} may or may not have been applied ({error.cause.message}); "
                "counting it as applied: the next train step's answer tells the finetune's step, "
                "and the count follows it",
                stacklevel=2,
            )
            return False
        if reported is None and self.on_ambiguous_step == "skip":
            warnings.warn(
                f"train step {step} may or may not have been applied ({error.cause.message}); "
                "counting it as applied and going on (on_ambiguous_step='skip')",
                stacklevel=2,
            )
            return False
        if reported is None:
            raise AmbiguousTrainStepError(
                f"train step {step} of adapter {adapter_id} may or may not have been applied "
                f"({error.cause.message}) and the server does not report train_steps. Resume from "
                f"the last checkpoint ({self.resume_hint()}) to continue exactly, or set "
                "on_ambiguous_step='skip' to count such steps as applied."
            ) from error
        raise AmbiguousTrainStepError(
            f"adapter {adapter_id} reports {reported} train steps where {applied_before} or "
            f"{step} were expected: is another run training it?"
        ) from error


@dataclass(frozen=True)
class _Sent:
    """A train step in flight, and the count it was sent after."""

    future: Future[TrainStepResult | None]
    adapter_id: str
    applied_before: int


def _batch_metrics(shards: list[Shard]) -> dict[str, float]:
    """Reward statistics over every rank's samples of the step."""
    rewards = [sample for shard in shards for sample in shard.rewards if sample]
    every_reward = [reward for sample in rewards for reward in sample]
    groups = sum(len(shard.groups) for shard in shards)
    sft_groups = sum(shard.sft_groups for shard in shards)
    metrics = {"groups": float(groups)}
    for shard in shards:
        for name, value in shard.counts.items():
            metrics[name] = metrics.get(name, 0.0) + value
    if sft_groups:
        metrics["sft_groups"] = float(sft_groups)
    if every_reward:
        metrics["reward_mean"] = math.fsum(every_reward) / len(every_reward)
        metrics["reward_std"] = spread(every_reward)
        metrics["frac_zero_std"] = 1.0 - (groups - sft_groups) / len(rewards)
        metrics["rollouts_time_s"] = max(shard.rollout_seconds for shard in shards)
    return metrics


def _rate_metrics(paces: list[Pace]) -> dict[str, float]:
    """The key's admitted rate (every rank's, summed) and its 429s so far, if any rank knows."""
    if not paces:
        return {}
    return {
        "admitted_rps": math.fsum(pace.rate or 0.0 for pace in paces),
        "rate_limited": float(sum(pace.rate_limited for pace in paces)),
    }


def _service_metrics(result: TrainStepResult) -> dict[str, float]:
    """The statistics the service reported about a train step."""
    values = {name: getattr(result, name) for name in SERVICE_STATISTICS}
    return {name: float(value) for name, value in values.items() if value is not None}
