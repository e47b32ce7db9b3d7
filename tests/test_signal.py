"""Requests that teach: prompts skipped ahead of sampling, steps topped up, 16 rollouts a request."""

from __future__ import annotations

import csv
import dataclasses
import itertools
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.loggers import CSVLogger
from support import detect_samples, loader, quiet_trainer

from lightning_moondream.api.client import DialectChoice
from lightning_moondream.module import MoondreamRLModule
from lightning_moondream.scoring import Scorer
from lightning_moondream.session import ServiceChoice, Session, SessionOptions
from lightning_moondream.session.signal import PromptFilter, SkipRule, prompt_key


class PromptReward:
    """Rewards by prompt: 0, 1, 0, 1, ... for ``informative`` ids, 1 for every other.

    It counts the rollouts it scores per prompt, so requests are counted where spent.
    """

    def __init__(self, informative: set[str]) -> None:
        self.informative = informative
        self.rollouts: dict[str, int] = {}
        self._flip = itertools.count()

    def __call__(self, sample: Any, rollout: Any) -> float:
        self.rollouts[sample.id] = self.rollouts.get(sample.id, 0) + 1
        return float(next(self._flip) % 2) if sample.id in self.informative else 1.0

    def requests(self, num_rollouts: int) -> dict[str, int]:
        return {key: count // num_rollouts for key, count in self.rollouts.items()}


def session(
    data_dir: Path, reward: Any, dialect: DialectChoice = "auto", **options: Any
) -> closing[Session]:
    """A session on the local service in ``data_dir`` (constant policy), closed after ``with``."""
    choice = ServiceChoice(
        local_dir=str(data_dir), local_options={"policy": "constant"}, dialect=dialect
    )
    options = {"num_rollouts": 2, **options}
    return closing(Session(SessionOptions(**options), choice, Scorer(reward)))


def train(run: Session, batch: list[Any], steps: range) -> list[dict[str, float]]:
    reports = []
    for step in steps:
        run.teacher.teach(batch, step, global_step=step)
        reports.append(run.step(lr=None).metrics)
    return reports


# The rule ---------------------------------------------------------------------------------


def test_the_chance_of_a_skip_grows_with_flat_groups_in_a_row_up_to_the_floor() -> None:
    rule = SkipRule(base=0.5, floor=0.1)
    assert [rule.probability(streak) for streak in range(5)] == [0.0, 0.5, 0.75, 0.875, 0.9]
    assert rule.probability(50) == 0.9
    assert SkipRule(base=0.5, floor=0.0).probability(60) == 1.0


def test_a_flat_group_adds_to_the_streak_and_one_with_spread_clears_it() -> None:
    prompt_filter = PromptFilter()
    sample = detect_samples("train", 1)[0]
    key = prompt_key(sample)
    prompt_filter.record([(key, False), (key, False)])
    assert prompt_filter.streak(sample) == 2
    prompt_filter.record([(key, True)])
    assert prompt_filter.streak(sample) == 0
    assert all(prompt_filter.select([sample], step) == [sample] for step in range(200))


def test_skips_follow_the_rule_and_repeat_exactly_with_the_same_seed() -> None:
    samples = detect_samples("train", 4)
    flat = {
        prompt_key(sample): streak for sample, streak in zip(samples, [0, 1, 2, 9], strict=True)
    }

    def selections(seed: int) -> list[list[str]]:
        prompt_filter = PromptFilter(SkipRule(base=0.5, floor=0.1), seed=seed)
        for key, streak in flat.items():
            prompt_filter.record([(key, False)] * streak)
        return [
            [sample.id for sample in prompt_filter.select(samples, step)] for step in range(2000)
        ]

    first = selections(seed=7)
    assert first == selections(seed=7)
    assert first != selections(seed=8)
    # Shares of 2000 seeded draws, against the chances of sampling 1, 0.5, 0.25, 0.1.
    shares = [sum(sample.id in kept for kept in first) / 2000 for sample in samples]
    assert shares[0] == 1.0
    assert shares[1] == pytest.approx(0.5, abs=0.03)
    assert shares[2] == pytest.approx(0.25, abs=0.03)
    assert shares[3] == pytest.approx(0.1, abs=0.02)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("skip_floor", 1.5, "skip_floor must be from 0 to 1, got 1.5"),
        ("max_extra_requests", -1, "max_extra_requests must be 0 or more, got -1"),
    ],
)
def test_options_out_of_range_are_refused_by_name(option: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SessionOptions(**{option: value})


# The teach path ---------------------------------------------------------------------------


def test_an_always_solved_prompt_is_skipped_and_comes_back_once_it_teaches(
    tmp_path: Path,
) -> None:
    solved, learning = detect_samples("train", 2)
    reward = PromptReward({learning.id})
    with session(tmp_path, reward, skip_prompts=True, skip_floor=0.2) as run:
        early = train(run, [solved, learning], range(30))
        assert early[0]["skipped_prompts"] == 0.0
        assert sum(report["skipped_prompts"] for report in early) >= 15
        assert reward.requests(2)[solved.id] == 30 - sum(r["skipped_prompts"] for r in early)
        assert all(report["groups"] == 1.0 for report in early)
        assert run.prompt_filter is not None and run.prompt_filter.streak(solved) >= 3

        reward.informative.add(solved.id)
        later = train(run, [solved, learning], range(30, 60))
        comeback = next(index for index, report in enumerate(later) if report["groups"] == 2.0)
        assert all(report["skipped_prompts"] == 0.0 for report in later[comeback:])
        assert all(report["groups"] == 2.0 for report in later[comeback:])


def test_dynamic_sampling_tops_a_step_up_within_its_bound(tmp_path: Path) -> None:
    batch = detect_samples("train", 4)
    reward = PromptReward({batch[0].id, batch[1].id})
    with session(tmp_path, reward, max_extra_requests=1) as run:
        (bounded,) = train(run, batch, range(1))
    assert (bounded["groups"], bounded["extra_requests"]) == (3.0, 1.0)

    reward = PromptReward({batch[0].id, batch[1].id})
    with session(tmp_path, reward, max_extra_requests=5) as run:
        (filled,) = train(run, batch, range(1))
    # Two groups were missing: both prompts that spread are sampled once more.
    assert (filled["groups"], filled["extra_requests"]) == (4.0, 2.0)
    requests = reward.requests(2)
    assert requests == {batch[0].id: 2, batch[1].id: 2, batch[2].id: 1, batch[3].id: 1}


def test_dynamic_sampling_has_nothing_to_sample_again_when_nothing_spread(tmp_path: Path) -> None:
    batch = detect_samples("train", 3)
    reward = PromptReward(set())
    with (
        session(tmp_path, reward, max_extra_requests=8) as run,
        pytest.warns(UserWarning, match="rollouts all scored alike"),
    ):
        (report,) = train(run, batch, range(1))
    assert (report["groups"], report["extra_requests"], report["skipped_steps"]) == (0.0, 0.0, 1.0)
    assert sum(reward.requests(2).values()) == 3


def test_a_step_whose_prompts_were_all_skipped_says_so(tmp_path: Path) -> None:
    batch = detect_samples("train", 1)
    with (
        session(tmp_path, PromptReward(set()), skip_prompts=True, skip_floor=0.0) as run,
        pytest.warns(UserWarning) as caught,
    ):
        reports = train(run, batch, range(8))
    assert [report["skipped_prompts"] for report in reports].count(1.0) >= 1
    messages = [str(warning.message) for warning in caught]
    # Each cause is told once: the flat groups, then the prompt skipped for them.
    assert sum("rollouts all scored alike" in message for message in messages) == 1
    assert sum("every prompt of a step was skipped" in message for message in messages) == 1
    assert reports[-1]["skipped_steps"] == 8.0


@pytest.mark.parametrize("dialect", ["adapters", "finetunes"])
def test_with_both_off_every_prompt_is_sampled_once_and_nothing_more_is_logged(
    tmp_path: Path, dialect: DialectChoice
) -> None:
    batch = detect_samples("train", 3)
    reward = PromptReward({batch[0].id})
    with session(tmp_path, reward, dialect, skip_prompts=False) as run:
        reports = train(run, batch, range(3))
        assert run.prompt_filter is None
        assert reward.requests(2) == {sample.id: 3 for sample in batch}
        assert [report["groups"] for report in reports] == [1.0, 1.0, 1.0]
        assert not {"skipped_prompts", "extra_requests"} & set(reports[0])
        assert run.remote.train_steps == 3


@pytest.mark.parametrize("dialect", ["adapters", "finetunes"])
def test_a_request_carries_sixteen_rollouts_end_to_end(
    tmp_path: Path, dialect: DialectChoice
) -> None:
    batch = detect_samples("train", 2)
    reward = PromptReward({sample.id for sample in batch})
    with session(tmp_path, reward, dialect, num_rollouts=16) as run:
        (report,) = train(run, batch, range(1))
        assert reward.rollouts == {sample.id: 16 for sample in batch}
        assert run.usage.snapshot()["rollouts"] == 32
        assert (report["groups"], run.remote.train_steps) == (2.0, 1)


def test_skipped_prompts_are_logged_at_every_step_of_a_trainer_run(tmp_path: Path) -> None:
    samples = detect_samples("train", 2)
    reward = PromptReward({samples[1].id})
    model = MoondreamRLModule(
        num_rollouts=2,
        reward=reward,
        local_service={"data_dir": str(tmp_path / "service"), "policy": "constant"},
        skip_prompts=True,
        skip_floor=0.0,
    )
    logger = CSVLogger(tmp_path, name="csv")
    trainer = quiet_trainer(tmp_path, max_steps=6, logger=logger, log_every_n_steps=1)
    trainer.fit(model, loader(samples, batch_size=2))
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/skipped_prompts")]
    # The solved prompt: sampled, flat, then skipped with chance 0.5, 0.75, ... (seed 0).
    skipped = [float(row["train/skipped_prompts"]) for row in rows]
    assert len(skipped) == 6 and skipped[0] == 0.0
    assert 1.0 in skipped
    assert reward.requests(2)[samples[0].id] == 6 - sum(skipped)


def test_a_prompt_is_known_by_its_id_else_by_its_image() -> None:
    first, second = (sample.encoded() for sample in detect_samples("train", 2))
    unnamed = [dataclasses.replace(sample, id="", object="circle") for sample in (first, second)]
    assert prompt_key(first) == prompt_key(dataclasses.replace(first, image=second.image))
    assert prompt_key(unnamed[0]) != prompt_key(unnamed[1])
    assert prompt_key(unnamed[0]) == prompt_key(dataclasses.replace(unnamed[0]))
