"""``RemoteStep`` bookkeeping: the service's step count is the truth, skipped steps apart."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from lightning_moondream.api import TrainStepResult
from lightning_moondream.distributed import Collective
from lightning_moondream.scoring import Scorer
from lightning_moondream.session import (
    AmbiguousTrainStepError,
    RemoteStep,
    ServiceChoice,
    Session,
    SessionOptions,
    Shard,
)


def remote_step(train_steps: int) -> RemoteStep:
    service = ServiceChoice(
        api_key=SecretStr("unused"),
        base_url="http://127.0.0.1:9/v1/tuning",
        dialect="finetunes",
        max_retries=0,
    )
    session = Session(SessionOptions(max_retries=0), service, Scorer())
    step = RemoteStep(
        session.connection,
        max_staleness=0,
        max_retries=0,
        on_ambiguous_step="raise",
        resume_hint=lambda: "ckpt_path='last.ckpt'",
    )
    step.reset(train_steps, steps_in_answers=True)
    return step


@pytest.mark.parametrize(
    ("result", "train_steps", "skipped"),
    [
        (TrainStepResult(step=5, applied=True), 5, 0),
        # lr 0: answered, not counted by the service.
        (TrainStepResult(step=4, applied=False), 4, 1),
        (TrainStepResult(applied=False), 4, 1),
        # A step in doubt counted as applied that the service never took.
        (TrainStepResult(step=3, applied=True), 3, 2),
        # /adapters answers nothing: the count stands.
        (TrainStepResult(), 5, 0),
    ],
    ids=["applied", "lr-0", "lr-0-no-step", "lost-earlier-step", "silent"],
)
def test_the_count_follows_the_step_the_service_reports(
    result: TrainStepResult, train_steps: int, skipped: int
) -> None:
    step = remote_step(5)
    step._reconcile("ft", 5, result)
    assert (step.train_steps, step.skipped_steps) == (train_steps, skipped)
    # Every global step is either applied by the service or counted as skipped.
    assert step.train_steps + step.skipped_steps == 5


def test_a_finetune_trained_elsewhere_stops_the_count() -> None:
    step = remote_step(5)
    with pytest.raises(
        AmbiguousTrainStepError, match="reports step 7 after this run's train step 5"
    ):
        step._reconcile("ft", 5, TrainStepResult(step=7, applied=True))


def test_a_step_without_groups_is_counted_as_skipped_and_not_sent() -> None:
    step = remote_step(2)
    step.add(Shard(rewards=[[1.0, 1.0]], rollout_seconds=0.5))
    # The base URL answers nothing: a request would fail the step.
    report = step.step(Collective(), "ft", lr=0.01)
    assert (report.train_steps, report.skipped_steps) == (2, 1)
    assert report.metrics == {
        "groups": 0.0,
        "reward_mean": 1.0,
        "reward_std": 0.0,
        "frac_zero_std": 1.0,
        "rollouts_time_s": 0.5,
        "skipped_steps": 1.0,
    }


def test_accumulated_shards_add_up() -> None:
    shard = Shard(groups=[{"mode": "sft"}], rewards=[], sft_groups=1, rollout_seconds=0.25)
    shard.add(Shard(groups=[{"mode": "rl"}], rewards=[[0.0, 1.0]], rollout_seconds=0.5))
    assert shard == Shard(
        groups=[{"mode": "sft"}, {"mode": "rl"}],
        rewards=[[0.0, 1.0]],
        sft_groups=1,
        rollout_seconds=0.75,
    )
