"""MoondreamRLModule in real Trainers against the in-process local service."""

from __future__ import annotations

import asyncio
import base64
import io
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from support import (
    alternating_reward,
    detect_samples,
    fit_on_detect_samples,
    loader,
    on_exception_trainer,
    quiet_trainer,
)
from torch.utils.data import DataLoader

from lightning_moondream.api import Rollout, TuningClient
from lightning_moondream.callbacks import RemoteCheckpoint
from lightning_moondream.data import QuerySample
from lightning_moondream.data.synthetic import make_scene, query_tasks, split_seed
from lightning_moondream.module import (
    CHECKPOINT_KEY,
    AmbiguousTrainStepError,
    MoondreamRLModule,
    ResumeMismatchError,
    _CloseOnException,
)
from lightning_moondream.session.remote_step import _Sent, spread


class ShapesData(L.LightningDataModule):
    """A user's own DataModule: plain DataLoaders whose batches are lists of samples."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            detect_samples("train", 32), batch_size=self.batch_size, collate_fn=list, shuffle=True
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(detect_samples("val", 8), batch_size=self.batch_size, collate_fn=list)


def trainer(root: Path, **kwargs: Any) -> L.Trainer:
    return quiet_trainer(root, **{"limit_val_batches": 1, **kwargs})


def service_adapter(root: Path, adapter_id: str) -> Any:
    with TuningClient.local(data_dir=root / "moondream-local-service") as client:
        return client.adapters.get(adapter_id)


@pytest.mark.parametrize("dialect", ["adapters", "finetunes"])
@pytest.mark.parametrize("max_staleness", [0, 1])
def test_fit_in_a_plain_trainer_with_a_users_datamodule(
    tmp_path: Path, max_staleness: int, dialect: str
) -> None:
    model = MoondreamRLModule(num_rollouts=4, max_staleness=max_staleness, dialect=dialect)  # type: ignore[arg-type]
    run = trainer(tmp_path, max_steps=3, val_check_interval=3, check_val_every_n_epoch=None)
    run.fit(model, ShapesData())
    assert run.global_step == 3
    metrics = run.callback_metrics
    assert {
        "train/reward_mean",
        "train/frac_zero_std",
        "val/reward",
        "val/map",
        "val/det_f1",
    } <= set(metrics)
    assert 0.0 <= float(metrics["train/reward_mean"]) <= 1.0
    # Every step the trainer counted was applied once on the service, no more.
    assert service_adapter(tmp_path, model.adapter.adapter_id).train_steps == 3
    assert model.usage.snapshot()["train_steps"] == 3


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("power cut")


def checkpointing_trainer(root: Path, max_steps: int, *callbacks: Callback) -> L.Trainer:
    """A trainer saving a checkpoint every 2 steps, and ``last.ckpt``, in ``root/ckpt``."""
    checkpoints = RemoteCheckpoint(
        dirpath=root / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1
    )
    return trainer(
        root,
        max_steps=max_steps,
        enable_checkpointing=True,
        callbacks=[checkpoints, *callbacks],
        limit_val_batches=0,
    )


def fit_from_checkpoint(
    root: Path, dialect: str, max_steps: int, checkpoint: Path | None = None
) -> tuple[MoondreamRLModule, L.Trainer]:
    """A new module fit up to ``max_steps`` from ``checkpoint`` (``root/ckpt/last.ckpt``)."""
    model = MoondreamRLModule(num_rollouts=4, dialect=dialect)  # type: ignore[arg-type]
    run = trainer(root, max_steps=max_steps, limit_val_batches=0)
    run.fit(model, ShapesData(), ckpt_path=checkpoint or root / "ckpt" / "last.ckpt")
    return model, run


def test_resume_after_a_crash_continues_from_the_api_checkpoint(tmp_path: Path) -> None:
    first = MoondreamRLModule(num_rollouts=4, dialect="adapters")
    with pytest.raises(RuntimeError, match="power cut"):
        checkpointing_trainer(tmp_path, 8, StopAt(3)).fit(first, ShapesData())
    old_adapter = first.adapter.adapter_id
    assert service_adapter(tmp_path, old_adapter).train_steps == 3
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2
    assert saved[CHECKPOINT_KEY]["adapter_id"] == old_adapter
    assert saved[CHECKPOINT_KEY]["checkpoint_id"].startswith(f"{old_adapter}/")

    second, run = fit_from_checkpoint(tmp_path, "adapters", max_steps=5)
    assert run.global_step == 5
    resumed = second.adapter.adapter_id
    assert resumed != old_adapter
    # The new adapter starts from the checkpoint at step 2: the third step of the crashed
    # run is not carried over, and 3 more are applied to reach step 5.
    assert service_adapter(tmp_path, resumed).train_steps == 3


def test_resume_on_finetunes_reattaches_only_at_the_checkpoints_step(tmp_path: Path) -> None:
    first = MoondreamRLModule(num_rollouts=4, dialect="finetunes")
    checkpointing_trainer(tmp_path, 4).fit(first, ShapesData())
    finetune = first.adapter.adapter_id
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)[CHECKPOINT_KEY]
    assert state == {
        "adapter_id": finetune,
        "checkpoint_id": f"{finetune}@4",
        "model_id": f"moondream3-preview/{finetune}@4",
        "dialect": "finetunes",
        "train_steps": 4,
        "skipped_steps": 0,
    }

    second, run = fit_from_checkpoint(tmp_path, "finetunes", max_steps=6)
    assert second.adapter.adapter_id == finetune
    assert run.global_step == 6
    assert service_adapter(tmp_path, finetune).train_steps == 6

    # The finetune has moved on past the step-2 checkpoint: resuming there would count
    # steps 3 to 6 twice, so the run stops and says why.
    step_2 = next((tmp_path / "ckpt").glob("*step=2.ckpt"))
    with pytest.raises(ResumeMismatchError, match="train step 2 but the finetune reports 6"):
        fit_from_checkpoint(tmp_path, "finetunes", max_steps=8, checkpoint=step_2)
    assert service_adapter(tmp_path, finetune).train_steps == 6


@pytest.mark.parametrize("dialect", ["adapters", "finetunes"])
def test_remote_checkpoint_deletes_api_checkpoints_with_their_files(
    tmp_path: Path, dialect: str
) -> None:
    model = MoondreamRLModule(num_rollouts=4, dialect=dialect)  # type: ignore[arg-type]
    checkpoints = RemoteCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/reward", mode="max", save_top_k=1
    )
    run = trainer(
        tmp_path,
        max_steps=4,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        enable_checkpointing=True,
        callbacks=[checkpoints],
    )
    run.fit(model, ShapesData())
    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(files) == 1
    service = tmp_path / "moondream-local-service"
    with TuningClient.local(data_dir=service, dialect=dialect) as client:  # type: ignore[arg-type]
        remote = [c.ref for c in client.checkpoints.iter(model.adapter.adapter_id)]
    kept = torch.load(files[0], weights_only=False)[CHECKPOINT_KEY]["checkpoint_id"]
    assert remote == [kept]
    assert checkpoints.best_api_checkpoint_id == kept


@pytest.mark.parametrize("dialect", ["adapters", "finetunes"])
def test_keep_remote_keeps_api_checkpoints(tmp_path: Path, dialect: str) -> None:
    model = MoondreamRLModule(num_rollouts=2, dialect=dialect)  # type: ignore[arg-type]
    checkpoints = RemoteCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=1, keep_remote=True
    )
    run = trainer(
        tmp_path,
        max_steps=3,
        enable_checkpointing=True,
        callbacks=[checkpoints],
        limit_val_batches=0,
    )
    run.fit(model, ShapesData())
    service = tmp_path / "moondream-local-service"
    with TuningClient.local(data_dir=service, dialect=dialect) as client:  # type: ignore[arg-type]
        assert len(list(client.checkpoints.iter(model.adapter.adapter_id))) == 3


def query_samples(count: int) -> list[QuerySample]:
    samples = []
    for index in range(count):
        scene = make_scene(split_seed("train", index))
        question, answers = query_tasks(scene)[0]
        samples.append(
            QuerySample(image=scene.image, question=question, answers=tuple(answers), id=str(index))
        )
    return samples


def answer_length(sample: Any, rollout: Rollout) -> float:
    return min(len(rollout.answer or ""), 10) / 10


async def async_is_digit(sample: Any, rollout: Rollout) -> float:
    return float((rollout.answer or "").strip().isdigit())


@pytest.mark.parametrize(
    "reward",
    [
        None,
        "token_f1",
        {"exact_match": 1.0, "contains": 1.0},
        f"{__name__}.answer_length",
        async_is_digit,
    ],
)
def test_query_training_with_each_kind_of_reward(tmp_path: Path, reward: Any) -> None:
    model = MoondreamRLModule(num_rollouts=4, reward=reward, reward_std_eps=0.0)
    loader = DataLoader(query_samples(8), batch_size=4, collate_fn=list)
    run = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    run.fit(model, train_dataloaders=loader)
    assert run.global_step == 2


def test_validate_and_test_without_fit_use_a_fresh_adapter(tmp_path: Path) -> None:
    model = MoondreamRLModule(train_settings={"max_objects": 4}, eval_settings={"max_objects": 4})
    run = trainer(tmp_path)
    [validated] = run.validate(
        model, DataLoader(detect_samples("val", 4), batch_size=2, collate_fn=list)
    )
    [tested] = run.test(model, DataLoader(detect_samples("test", 4), batch_size=4, collate_fn=list))
    assert set(validated) >= {"val/reward", "val/map", "val/map_50", "val/det_miou"}
    assert set(tested) >= {"test/reward", "test/map", "test/det_f1"}
    # Each stage made its adapter for itself alone, and removed it afterwards.
    with TuningClient.local(data_dir=tmp_path / "moondream-local-service") as client:
        assert list(client.adapters.iter()) == []


class _Reward:
    """0, 1, 0, 1, ... or, while ``broken``, an error."""

    def __init__(self) -> None:
        self.broken = False
        self._alternating = alternating_reward()

    def __call__(self, sample: Any, rollout: Rollout) -> float:
        if self.broken:
            raise ZeroDivisionError("reward broken")
        return self._alternating(sample, rollout)


def test_a_failed_validation_removes_its_adapter_and_a_later_fit_keeps_its_own(
    tmp_path: Path,
) -> None:
    service = {"data_dir": str(tmp_path / "service"), "policy": "constant"}
    reward = _Reward()
    model = MoondreamRLModule(num_rollouts=2, reward=reward, local_service=service)
    reward.broken = True
    with pytest.raises(ZeroDivisionError):
        trainer(tmp_path).validate(model, loader(detect_samples("val", 2), 2))
    with TuningClient.local(**service) as client:
        assert list(client.adapters.iter()) == []
    reward.broken = False
    fit_on_detect_samples(model, tmp_path, steps=2, batch_size=1)
    with TuningClient.local(**service) as client:
        [adapter] = client.adapters.iter()
        assert adapter.train_steps == 2


def test_after_ctrl_c_a_step_in_flight_is_not_waited_for_and_blocks_checkpoints(
    tmp_path: Path,
) -> None:
    model = MoondreamRLModule(local_service={"data_dir": str(tmp_path), "policy": "constant"})
    adapter_id = model.adapter.adapter_id
    # A train step that never answers, as one stuck on the service.
    stuck = model.session.connection.submit(asyncio.sleep(3600))
    model.session.remote._pending = _Sent(stuck, adapter_id, applied_before=0)  # type: ignore[arg-type]
    _CloseOnException().on_exception(cast(Any, None), model, KeyboardInterrupt())
    with pytest.raises(AmbiguousTrainStepError, match="not checkpointing"):
        model.on_save_checkpoint({})


def test_one_set_of_settings_serves_batches_of_mixed_skills(tmp_path: Path) -> None:
    samples = [*detect_samples("train", 2), *query_samples(2)]
    model = MoondreamRLModule(num_rollouts=2, train_settings={"max_objects": 3}, reward_std_eps=0.0)
    run = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    run.fit(model, train_dataloaders=DataLoader(samples, batch_size=4, collate_fn=list))
    assert run.global_step == 1


def test_greedy_evaluation_does_not_depend_on_batch_size(tmp_path: Path) -> None:
    model = MoondreamRLModule(max_concurrency=3, local_service={"data_dir": str(tmp_path)})
    samples = detect_samples("val", 6)
    by_two = model.evaluate(DataLoader(samples, batch_size=2, collate_fn=list))
    by_six = model.evaluate(DataLoader(samples, batch_size=6, collate_fn=list))
    model.close()
    assert by_two == pytest.approx(by_six)
    assert by_two["samples"] == 6


@pytest.mark.parametrize(
    ("batch", "error", "fragment"),
    [
        ([], ValueError, "batch 0 is empty"),
        (torch.zeros(2, 3), TypeError, "a list of samples"),
        (["not a sample"], TypeError, "item 0 is a str"),
    ],
)
def test_a_bad_batch_names_the_problem(batch: Any, error: type[Exception], fragment: str) -> None:
    model = MoondreamRLModule()
    with pytest.raises(error, match=fragment):
        model.training_step(batch, 0)


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"rank": 12}, "rank must be 8, 16, 24 or 32"),
        ({"num_rollouts": 17}, "num_rollouts"),
        ({"num_rollouts": 1}, "from 2 to 16"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_staleness": 2}, "max_staleness"),
        ({"reward": "no_such_reward"}, "no_such_reward"),
        ({"reward": "math.no_such_function"}, "cannot be imported"),
        ({"on_ambiguous_step": "retry"}, "on_ambiguous_step"),
    ],
)
def test_invalid_arguments_are_refused(arguments: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        MoondreamRLModule(**arguments)


@pytest.mark.parametrize("rewards", [[0.0, 1.0], [0.25] * 5, [0.1, 0.7, 0.3, 0.9, 0.55], [3.0]])
def test_reward_spread_is_the_population_standard_deviation(rewards: list[float]) -> None:
    assert spread(rewards) == pytest.approx(statistics.pstdev(rewards), abs=1e-12)


class _LoggerFailsAtStep2(MoondreamRLModule):
    """Its logging fails once the second train step was sent, as its statistics are logged."""

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if name == "train/reward_std" and self.global_step == 2:
            raise RuntimeError("logger down")
        super().log(name, value, *args, **kwargs)


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_a_failure_after_a_step_is_sent_still_counts_it(tmp_path: Path, max_staleness: int) -> None:
    service = tmp_path / "service"
    model = _LoggerFailsAtStep2(
        num_rollouts=2,
        max_staleness=max_staleness,
        reward=alternating_reward(),
        local_service={"data_dir": str(service), "policy": "constant"},
    )
    trainer = on_exception_trainer(tmp_path, max_steps=5)
    with pytest.raises(RuntimeError, match="logger down"):
        trainer.fit(model, loader(detect_samples("train", 8), batch_size=1))
    saved = torch.load(tmp_path / "ckpt" / "on_exception.ckpt", weights_only=False)
    state = saved[CHECKPOINT_KEY]
    assert saved["global_step"] == state["train_steps"] == 2
    with TuningClient.local(data_dir=service, policy="constant") as client:
        assert client.adapters.get(state["adapter_id"]).train_steps == 2


def test_a_sample_from_a_users_loader_is_sent_at_the_default_size_cap(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from lightning_moondream.images import EncodingOptions
    from lightning_moondream.module import SAMPLE_ENCODING

    pixels = np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    [sample] = detect_samples("val", 1)
    large = replace(sample, image=Image.fromarray(pixels), image_size=(1600, 1200))
    model = MoondreamRLModule(local_service={"data_dir": str(tmp_path), "policy": "constant"})
    model.generate([large])
    model.close()
    full = large.encoded(EncodingOptions()).image
    capped = large.encoded(SAMPLE_ENCODING)
    with Image.open(io.BytesIO(base64.b64decode(capped.image.split(",", 1)[1]))) as sent_image:
        assert sent_image.size == (768, 576)
    # One request carrying the capped image, not the full-size one.
    sent = model.usage.snapshot()["bytes_sent"]
    assert len(capped.image) <= sent < len(full)
