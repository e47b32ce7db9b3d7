"""Teaching: each batch sampled and scored (or its SFT targets taken) into this rank's shard.

With ``skip_prompts``, prompts whose recent groups had no reward spread may be skipped
ahead of sampling; with ``max_extra_requests``, prompts that spread are sampled again
until the step holds enough groups that teach (dynamic sampling).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from lightning_moondream.api import Adapter
from lightning_moondream.distributed import Collective
from lightning_moondream.scoring import Sample, Scorer
from lightning_moondream.session.connection import Connection
from lightning_moondream.session.options import SessionOptions
from lightning_moondream.session.remote_step import RemoteStep, Shard
from lightning_moondream.session.sampling import (
    check_batch,
    concurrency,
    encoded,
    rollout_calls,
    sample_and_score,
    share,
)
from lightning_moondream.session.signal import Harvest, PromptFilter, SkipRule, resampled


class TeachingSession(Protocol):
    """What teaching needs of its session."""

    options: SessionOptions
    scorer: Scorer
    collective: Collective
    connection: Connection
    remote: RemoteStep

    @property
    def adapter(self) -> Adapter:
        """The adapter, opened on first use (on every rank)."""
        ...


class Teacher:
    """Turns a session's batches into this rank's shards of the next train step.

    Args:
        session: The session whose adapter is taught.
    """

    def __init__(self, session: TeachingSession) -> None:
        self._session = session
        options = session.options
        self.prompt_filter = (
            PromptFilter(SkipRule(floor=options.skip_floor)) if options.skip_prompts else None
        )
        """Skips prompts whose recent groups had no spread (``skip_prompts``), else ``None``."""

    def teach(self, batch: Sequence[Sample], batch_idx: int, global_step: int) -> None:
        """Sample and score a batch (or take its SFT targets) for the next train step.

        With ``skip_prompts``, prompts whose recent groups had no reward spread may be
        skipped; every process then records every process's groups, so all of them
        draw alike. A failure on any rank ends every rank here (on every rank).
        """
        session = self._session
        error: Exception | None = None
        outcomes: list[tuple[str, bool]] = []
        try:
            samples = encoded(check_batch(batch, batch_idx))
            # Opened before the shard is made, even when every prompt is skipped and
            # nothing is sampled: opening resets the step's shards.
            session.adapter  # noqa: B018
            shard, outcomes = self._shard(samples, global_step)
            session.remote.add(shard)
        except Exception as exc:
            error = exc
        session.collective.check(error)
        if self.prompt_filter is not None:
            for sampled in session.collective.all_gather(outcomes):
                self.prompt_filter.record(sampled)

    def _shard(
        self, samples: list[Sample], global_step: int
    ) -> tuple[Shard, list[tuple[str, bool]]]:
        options = self._session.options
        settings = options.training
        if global_step < options.sft_warmup_steps:
            taught = [sample.sft_group(settings) for sample in samples]
            return Shard(groups=taught, sft_groups=len(taught)), []
        started = time.perf_counter()
        chosen = samples
        counts: dict[str, int] = {}
        if self.prompt_filter is not None:
            chosen = self.prompt_filter.select(samples, global_step)
            counts["skipped_prompts"] = len(samples) - len(chosen)
        harvest = self._sample(chosen, wanted=len(samples))
        if options.max_extra_requests:
            counts["extra_requests"] = harvest.extra_requests
        taught = [sample.sft_group(settings) for sample in share(samples, options.sft_share)]
        shard = Shard(
            groups=harvest.groups + taught,
            rewards=harvest.rewards,
            sft_groups=len(taught),
            rollout_seconds=time.perf_counter() - started,
            counts=counts,
        )
        return shard, harvest.outcomes

    def _sample(self, samples: list[Sample], wanted: int) -> Harvest:
        """Sample and score ``samples``, then sample again those that spread (dynamic sampling).

        Waves follow until ``wanted`` groups spread, ``max_extra_requests`` are spent, or
        no prompt of the last wave spread.
        """
        session = self._session
        options, scorer, connection = session.options, session.scorer, session.connection
        harvest = Harvest()
        wave, budget = samples, options.max_extra_requests
        while wave:
            calls = rollout_calls(
                session.adapter.adapter_id,
                wave,
                options.training,
                options.num_rollouts,
                scorer,
            )
            in_flight = connection.in_flight()
            limit = concurrency(options.max_concurrency, len(calls), in_flight)
            scored = connection.run(sample_and_score(connection.client, calls, wave, scorer, limit))
            taught = harvest.add(wave, scored, options.reward_std_eps)
            wave = resampled(taught, wanted - len(harvest.groups), budget)
            budget -= len(wave)
            harvest.extra_requests += len(wave)
        return harvest
