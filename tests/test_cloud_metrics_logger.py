"""``CloudMetricsLogger`` forwards what Lightning logs to the finetune's metrics."""

from __future__ import annotations

import csv
import logging
import math
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.loggers import CSVLogger
from support import alternating_reward, detect_samples, loader, quiet_trainer, serving

from lightning_moondream.api import TuningClient
from lightning_moondream.callbacks import RemoteCheckpoint
from lightning_moondream.loggers import CloudMetricsLogger
from lightning_moondream.module import MoondreamRLModule
from lightning_moondream.server import create_app


def fit(tmp_path: Path, cloud: CloudMetricsLogger, **options: Any) -> tuple[Any, Any]:
    model = MoondreamRLModule(num_rollouts=2, reward=alternating_reward(), **options)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=3,
        log_every_n_steps=1,
        logger=[CSVLogger(tmp_path, name="csv"), cloud],
        limit_val_batches=1,
        val_check_interval=3,
        enable_checkpointing=True,
        callbacks=[RemoteCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    trainer.fit(model, loader(detect_samples("train", 6)), loader(detect_samples("val", 2)))
    return model, trainer


def test_metrics_logged_in_a_run_are_stored_with_the_finetune(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cloud = CloudMetricsLogger()
    with caplog.at_level(logging.INFO):
        model, trainer = fit(tmp_path, cloud, dialect="finetunes")
    finetune = model.adapter.adapter_id
    assert cloud.version == finetune

    with TuningClient.local(data_dir=tmp_path / "moondream-local-service") as client:
        stored = client.metrics.read(finetune)
    in_cloud = {(row["step"], row["name"]): row["value"] for row in stored}
    with open(Path(trainer.loggers[0].log_dir) / "metrics.csv") as file:
        in_csv = {
            (int(row["step"]), name): float(value)
            for row in csv.DictReader(file)
            for name, value in row.items()
            if value and name not in ("step", "epoch")
        }
    # The dashboard holds what the CSV file holds, step by step.
    assert in_cloud == pytest.approx(in_csv)
    assert {name for _, name in in_cloud} >= {"train/reward_mean", "train/kl", "val/reward"}
    # After fit, the kept checkpoints are named with their inference models.
    assert f"moondream3-preview/{finetune}@3" in caplog.text


def test_on_an_adapters_service_it_warns_once_and_the_run_goes_on(tmp_path: Path) -> None:
    app = create_app(data_dir=tmp_path / "service", api_keys=["k"], dialect="adapters")
    cloud = CloudMetricsLogger(include=["train/"])
    with serving(app) as url, pytest.warns(UserWarning, match="sends nothing") as caught:
        _, trainer = fit(tmp_path, cloud, api_key="k", base_url=url)
    assert trainer.global_step == 3
    assert sum("sends nothing" in str(warning.message) for warning in caught) == 1


class StoredMetrics:
    """A sink that stores at once, standing for the module in unit tests of the logger."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, dict[str, float]]] = []

    def send_metrics(self, step: int, metrics: dict[str, float]) -> Future[Any]:
        self.sent.append((step, dict(metrics)))
        done: Future[Any] = Future()
        done.set_result(len(metrics))
        return done


def test_values_that_are_not_finite_are_left_out_with_one_warning() -> None:
    cloud = CloudMetricsLogger()
    sink = StoredMetrics()
    cloud.bind(sink, "ft")
    with pytest.warns(UserWarning, match="leaves out train/kl: its value is not finite"):
        cloud.log_metrics({"train/kl": math.nan, "train/reward_mean": 0.5, "epoch": 0}, step=1)
    cloud.log_metrics({"train/kl": math.inf}, step=2)
    assert sink.sent == [(1, {"train/reward_mean": 0.5})]


def test_metrics_logged_before_the_finetune_is_known_are_sent_once_it_is() -> None:
    cloud = CloudMetricsLogger(include=["val/"])
    cloud.log_metrics({"val/map": 0.25, "train/loss": 1.0}, step=0)
    sink = StoredMetrics()
    cloud.bind(sink, "ft")
    cloud.log_metrics({"val/map": 0.5}, step=4)
    assert sink.sent == [(0, {"val/map": 0.25}), (4, {"val/map": 0.5})]
