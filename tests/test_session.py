"""``Session`` without a Trainer, against the local tuning service running in the process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from support import alternating_reward, detect_samples

from lightning_moondream.api import RolloutsResponse, TuningClient
from lightning_moondream.api.client import DialectChoice
from lightning_moondream.metrics import SkillMetrics
from lightning_moondream.scoring import Sample, Scorer
from lightning_moondream.session import (
    BenchmarkTally,
    EvaluationLoop,
    ServiceChoice,
    Session,
    SessionOptions,
)


def local_session(
    data_dir: Path, dialect: DialectChoice = "auto", reward: Any = None, **options: Any
) -> Session:
    choice = ServiceChoice(
        local_dir=str(data_dir), local_options={"policy": "constant"}, dialect=dialect
    )
    return Session(SessionOptions(num_rollouts=2, **options), choice, Scorer(reward))


def service_adapter(data_dir: Path, adapter_id: str) -> Any:
    with TuningClient.local(data_dir=data_dir) as client:
        return client.adapters.get(adapter_id)


def test_the_session_layer_imports_without_lightning_or_the_local_service() -> None:
    code = (
        "import sys, lightning_moondream.session; "
        "print(sorted({m.split('.')[0] for m in sys.modules} "
        "& {'lightning', 'pytorch_lightning', 'fastapi'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("dialect", ["adapters", "finetunes"])
def test_a_session_trains_an_adapter_step_by_step(tmp_path: Path, dialect: DialectChoice) -> None:
    session = local_session(tmp_path, dialect, reward=alternating_reward())
    for index, batch in enumerate([detect_samples("train", 2), detect_samples("train", 2, 2)]):
        session.teacher.teach(batch, index, global_step=index)
        report = session.step(lr=None)
        assert (report.train_steps, report.skipped_steps) == (index + 1, 0)
        assert report.metrics["groups"] == 2.0
    adapter_id = session.adapter.adapter_id
    assert session.dialect == dialect
    assert session.usage.snapshot()["train_steps"] == 2
    session.close()
    assert service_adapter(tmp_path, adapter_id).train_steps == 2


def test_a_batch_that_is_not_samples_is_refused_before_connecting(tmp_path: Path) -> None:
    session = local_session(tmp_path)
    with pytest.raises(TypeError, match="batch 4 item 1 is a str, not a Moondream sample"):
        session.teacher.teach([*detect_samples("train", 1), "cat.jpg"], 4, global_step=0)
    assert not session.connection.connected


def test_one_api_checkpoint_per_state_and_a_resume_from_it(tmp_path: Path) -> None:
    first = local_session(tmp_path, "adapters", reward=alternating_reward())
    first.teacher.teach(detect_samples("train", 2), 0, global_step=0)
    first.step(lr=None)
    state = first.save_checkpoint()
    assert state is not None
    # Saved again with nothing trained in between: the same API checkpoint.
    assert first.save_checkpoint() == state
    assert state["adapter_id"] == first.adapter.adapter_id
    assert (state["dialect"], state["train_steps"], state["skipped_steps"]) == ("adapters", 1, 0)
    first.close()

    second = local_session(tmp_path, "adapters")
    second.resume(state)
    assert second.adapter.adapter_id != state["adapter_id"]
    assert second.resumed_from == state["checkpoint_id"]
    # A new adapter counts its own steps; the checkpoint's weights are its start.
    assert second.remote.train_steps == 0
    second.close()


def test_a_checkpoint_of_an_earlier_version_still_resumes(tmp_path: Path) -> None:
    first = local_session(tmp_path, "adapters")
    state = first.save_checkpoint()
    assert state is None  # no adapter open yet: nothing to save
    first.adapter  # noqa: B018
    state = first.save_checkpoint()
    assert state is not None
    first.close()
    # Written before the dialect and skipped steps were recorded.
    old = {"adapter_id": state["adapter_id"], "checkpoint_id": state["checkpoint_id"]}
    second = local_session(tmp_path, "adapters")
    second.resume(old)
    assert second.adapter.adapter_id != old["adapter_id"]
    assert (second.remote.train_steps, second.remote.skipped_steps) == (0, 0)
    second.close()


def test_a_finetune_resumes_as_itself(tmp_path: Path) -> None:
    first = local_session(tmp_path, "finetunes", reward=alternating_reward())
    first.teacher.teach(detect_samples("train", 2), 0, global_step=0)
    first.step(lr=None)
    state = first.save_checkpoint()
    first.close()
    assert state is not None and state["checkpoint_id"] == f"{state['adapter_id']}@1"
    second = local_session(tmp_path, "finetunes")
    second.resume(state)
    assert second.adapter.adapter_id == state["adapter_id"]
    second.close()


def test_an_adapter_made_only_to_evaluate_is_deleted_with_the_stage(tmp_path: Path) -> None:
    session = local_session(tmp_path)
    session.join(tmp_path, evaluating_only=True)
    values = session.evaluate([detect_samples("val", 2), detect_samples("val", 1, 2)])
    assert values["samples"] == 3.0
    assert 0.0 <= values["reward"] <= 1.0
    assert "det_f1" in values
    session.release()
    with TuningClient.local(data_dir=tmp_path) as client:
        assert list(client.adapters.iter()) == []


def test_the_dialect_the_client_settled_outlives_a_reconnection(tmp_path: Path) -> None:
    session = local_session(tmp_path, "auto")
    session.adapter  # noqa: B018 - opening settles the dialect
    settled = session.dialect
    assert settled in ("adapters", "finetunes")
    session.close()
    assert session.client.dialect == settled
    session.close()


def test_sft_or_lr_asked_of_adapters_is_refused_and_its_adapter_goes(tmp_path: Path) -> None:
    session = local_session(tmp_path, "adapters", sft_share=0.5)
    with pytest.raises(ValueError, match="sft_share, lr: the service speaks the /adapters"):
        session.check_training(lr=0.01)
    session.release()
    with TuningClient.local(data_dir=tmp_path) as client:
        assert list(client.adapters.iter()) == []


def truthful_model(samples: Sequence[Sample]) -> Any:
    """A model that answers every detect sample with its true boxes, with no reward."""

    async def answer() -> list[RolloutsResponse]:
        return [
            RolloutsResponse(
                {"request": {}, "rollouts": [{"output": sample.target()}], "rewards": None}
            )
            for sample in samples
        ]

    return answer()


def test_the_evaluation_loop_takes_any_greedy_model() -> None:
    samples = detect_samples("val", 3)
    groups: list[int] = []
    tally = BenchmarkTally(RecordingMetric(groups), group=lambda index: index * 10)
    loop = EvaluationLoop(truthful_model, Scorer(), SkillMetrics(), [tally])
    scored = asyncio.run(loop.answer(samples[:2])) + asyncio.run(loop.answer(samples[2:]))
    assert [item.index for item in scored] == [0, 1, 2]
    # Without rewards from a service, answers are scored by the client-side formulas.
    assert [item.reward for item in scored] == [1.0, 1.0, 1.0]
    values = loop.results()
    assert (values["samples"], values["reward"], values["det_f1"]) == (3.0, 1.0, 1.0)
    assert groups == [0, 10, 20]
    assert tally.compute() == {"seen": 3.0}


class RecordingMetric:
    """Stands for a benchmark metric: keeps the groups it is given."""

    def __init__(self, groups: list[int]) -> None:
        self.groups = groups

    def update(self, output: Any, target: Any, group: int, label: str, size: Any) -> None:
        self.groups.append(group)

    def compute(self) -> dict[str, float]:
        return {"seen": float(len(self.groups))}


@pytest.mark.parametrize(
    ("choice", "environment", "local"),
    [
        (ServiceChoice(), {}, True),
        (ServiceChoice(), {"MOONDREAM_API_KEY": "key"}, False),
        (ServiceChoice(), {"MOONDREAM_TUNING_URL": "http://127.0.0.1:9/v1/tuning"}, False),
        (ServiceChoice(base_url="http://127.0.0.1:9/v1/tuning"), {}, False),
        (ServiceChoice(local_dir="here"), {"MOONDREAM_API_KEY": "key"}, True),
        # A folder among the local service's options does not choose it.
        (ServiceChoice(local_options={"data_dir": "here"}), {"MOONDREAM_API_KEY": "key"}, False),
    ],
    ids=["nothing", "key", "url-env", "url", "local-dir", "local-option"],
)
def test_one_rule_chooses_the_service(
    choice: ServiceChoice, environment: dict[str, str], local: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MOONDREAM_API_KEY", raising=False)
    monkeypatch.delenv("MOONDREAM_TUNING_URL", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert choice.uses_local_service is local


def test_the_local_service_keeps_its_data_under_the_runs_root(tmp_path: Path) -> None:
    assert ServiceChoice().data_dir(tmp_path) == str(tmp_path / "moondream-local-service")
    assert ServiceChoice(local_dir="mine").data_dir(tmp_path) == "mine"


def test_bad_options_name_the_option() -> None:
    with pytest.raises(ValueError, match="max_staleness must be 0 or 1, got 2"):
        SessionOptions(max_staleness=2)
    with pytest.raises(ValueError, match="dialect must be one of"):
        ServiceChoice(dialect="cloud")  # type: ignore[arg-type]


def test_a_resumed_session_skips_prompts_as_an_unbroken_one(tmp_path: Path) -> None:
    batch = detect_samples("train", 3)

    def run(session: Session, steps: range) -> list[float]:
        skipped = []
        for step in steps:
            session.teacher.teach(batch, step, global_step=step)
            skipped.append(session.step(lr=None).metrics["skipped_prompts"])
        return skipped

    options: dict[str, Any] = {"skip_prompts": True, "skip_floor": 0.0}
    unbroken = local_session(tmp_path / "unbroken", "finetunes", reward=constant, **options)
    with pytest.warns(UserWarning):
        expected = run(unbroken, range(8))
    unbroken.close()

    first = local_session(tmp_path / "resumed", "finetunes", reward=constant, **options)
    with pytest.warns(UserWarning):
        skipped = run(first, range(4))
    state = first.save_checkpoint()
    first.close()
    assert state is not None and state["prompt_streaks"]
    second = local_session(tmp_path / "resumed", "finetunes", reward=constant, **options)
    second.resume(state)
    with pytest.warns(UserWarning):
        skipped += run(second, range(4, 8))
    second.close()
    # Every prompt is always solved: the later steps skip most of them, the same ones.
    assert sum(expected[4:]) > 0
    assert skipped == expected


def constant(sample: Any, rollout: Any) -> float:
    return 1.0


def test_evaluation_keeps_in_flight_what_the_admitted_rate_calls_for(tmp_path: Path) -> None:
    session = local_session(tmp_path, reward=alternating_reward(), requests_per_second=4.0)
    session.teacher.teach(detect_samples("train", 4), 0, global_step=0)
    session.step(lr=None)
    client = session.connection.client
    asked: list[int] = []
    rollouts_many = client.rollouts_many

    async def recording(calls: Any, *, max_concurrency: int = 8) -> Any:
        asked.append(max_concurrency)
        return await rollouts_many(calls, max_concurrency=max_concurrency)

    client.rollouts_many = recording  # type: ignore[method-assign]
    in_flight = session.connection.in_flight()
    assert in_flight is not None
    session.evaluate([detect_samples("val", 12)])
    session.close()
    # Little's law: 4/s over a local round trip (under 2.75 s) is a few, not the batch.
    assert asked == [in_flight] and in_flight < 12
