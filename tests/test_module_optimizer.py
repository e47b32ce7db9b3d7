"""The optimizer step is the remote train step: lr schedules, SFT, accumulation, clipping.

Each run trains against the local service over real HTTP on 127.0.0.1, behind a
recorder of the ``/train_step`` bodies it receives.
"""

from __future__ import annotations

import csv
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from support import alternating_reward, fit_on_detect_samples, read_request, serving
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR

from lightning_moondream.api import TuningClient
from lightning_moondream.callbacks import RemoteCheckpoint
from lightning_moondream.module import CHECKPOINT_KEY, MoondreamRLModule
from lightning_moondream.server import create_app

KEY = "optimizer-test-key"


class RecordTrainSteps:
    """Keep the JSON body of every ``/train_step`` request the app receives."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/train_step"):
            await self.app(scope, receive, send)
            return
        body, replay = await read_request(receive)
        self.bodies.append(json.loads(body))
        await self.app(scope, replay, send)


def recorded_service(
    tmp_path: Path, dialect: str = "finetunes", policy: str = "constant"
) -> RecordTrainSteps:
    """The local service (by default the no-compute policy) behind a train step recorder."""
    app = create_app(data_dir=tmp_path / "service", api_keys=[KEY], policy=policy, dialect=dialect)
    return RecordTrainSteps(app)


def module(url: str, **options: Any) -> MoondreamRLModule:
    return MoondreamRLModule(
        api_key=KEY,
        base_url=url,
        num_rollouts=2,
        reward=alternating_reward(),
        **options,
    )


def test_each_train_step_carries_the_scheduled_lr(tmp_path: Path) -> None:
    recorder = recorded_service(tmp_path)
    with serving(recorder) as url:
        model = module(url, lr=0.01, lr_scheduler=partial(CosineAnnealingLR, T_max=4))
        trainer = fit_on_detect_samples(
            model,
            tmp_path,
            steps=4,
            logger=CSVLogger(tmp_path, name="logs"),
            callbacks=[LearningRateMonitor()],
            log_every_n_steps=1,
        )

    cosine = [0.01 * (1 + math.cos(math.pi * step / 4)) / 2 for step in range(4)]
    assert [body["lr"] for body in recorder.bodies] == pytest.approx(cosine)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as file:
        logged = [float(row["lr-SGD"]) for row in csv.DictReader(file) if row.get("lr-SGD")]
    # LearningRateMonitor shows what the service received.
    assert logged == pytest.approx(cosine, rel=1e-6)


def test_without_lr_the_service_default_applies(tmp_path: Path) -> None:
    recorder = recorded_service(tmp_path)
    with serving(recorder) as url:
        fit_on_detect_samples(module(url), tmp_path, steps=2)
    assert [("lr" in body) for body in recorder.bodies] == [False, False]


def test_sft_warmup_then_rl_steps_with_an_sft_share(tmp_path: Path) -> None:
    recorder = recorded_service(tmp_path)
    with serving(recorder) as url:
        model = module(url, lr=0.003, sft_warmup_steps=2, sft_share=0.5)
        trainer = fit_on_detect_samples(model, tmp_path, steps=4, batch_size=4, log_every_n_steps=1)

    modes = [
        sorted(group.get("mode", "rl") for group in body["groups"]) for body in recorder.bodies
    ]
    # Warm-up: every sample's ground truth, no rollouts; then RL groups and half the
    # batch taught again.
    assert modes[:2] == [["sft"] * 4, ["sft"] * 4]
    assert modes[2:] == [["rl"] * 4 + ["sft"] * 2] * 2
    targets = [group["target"] for group in recorder.bodies[0]["groups"]]
    assert all(target["boxes"] for target in targets)
    assert trainer.callback_metrics["train/sft_groups"] == 2


def test_accumulated_batches_are_sent_as_one_train_step(tmp_path: Path) -> None:
    recorder = recorded_service(tmp_path)
    with serving(recorder) as url:
        model = module(url)
        trainer = fit_on_detect_samples(model, tmp_path, steps=2, accumulate_grad_batches=3)

    assert [len(body["groups"]) for body in recorder.bodies] == [6, 6]
    assert trainer.global_step == model.train_steps == 2


def test_gradient_clipping_is_left_to_the_service(tmp_path: Path) -> None:
    recorder = recorded_service(tmp_path)
    with serving(recorder) as url, pytest.warns(UserWarning, match="clipped on the Moondream"):
        trainer = fit_on_detect_samples(module(url), tmp_path, steps=2, gradient_clip_val=1.0)
    assert trainer.global_step == len(recorder.bodies) == 2


@pytest.mark.parametrize(
    ("options", "named"),
    [({"sft_warmup_steps": 2}, "sft_warmup_steps"), ({"lr": 0.01}, "lr")],
)
def test_sft_and_lr_need_a_finetunes_service(
    tmp_path: Path, options: dict[str, Any], named: str
) -> None:
    recorder = recorded_service(tmp_path, dialect="adapters")
    with serving(recorder) as url:
        with pytest.raises(ValueError, match=f"^{named}: the service speaks the /adapters"):
            fit_on_detect_samples(module(url, **options), tmp_path, steps=2)
        with TuningClient(api_key=KEY, base_url=url) as client:
            # The adapter made for the refused run went with it.
            assert list(client.adapters.iter()) == []
    assert recorder.bodies == []


def test_a_step_at_lr_0_counts_as_skipped_and_checkpoints_stay_exact(tmp_path: Path) -> None:
    recorder = recorded_service(tmp_path, policy="reference")
    checkpoints = RemoteCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, keep_remote=True
    )
    with serving(recorder) as url:
        model = module(
            url,
            lr=0.01,
            # A warm-up from lr 0: the first step is computed but changes nothing.
            lr_scheduler=partial(LambdaLR, lr_lambda=lambda step: float(step > 0)),
            max_staleness=1,
        )
        trainer = fit_on_detect_samples(
            model, tmp_path, steps=3, enable_checkpointing=True, callbacks=[checkpoints]
        )
        with TuningClient(api_key=KEY, base_url=url) as client:
            served = client.adapters.get(model.adapter.adapter_id).train_steps

    assert [body["lr"] for body in recorder.bodies] == [0.0, 0.01, 0.01]
    assert (model.train_steps, model.skipped_steps, served) == (2, 1, 2)
    for path in sorted((tmp_path / "ckpt").glob("*.ckpt")):
        saved = torch.load(path, weights_only=False)
        state = saved[CHECKPOINT_KEY]
        assert state["train_steps"] + state["skipped_steps"] == saved["global_step"]
    # The statistics of steps drained for checkpoints are still logged.
    assert "train/kl" in trainer.callback_metrics
