"""Steps that send nothing show in the progress bar and in a warning at the end of fit.

Both runs are the README's "own Lightning project" example against the local service:
with one sample of one box (every rollout scores alike), and as the README gives it
(generated scenes of several shapes), shortened.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from torch.utils.data import DataLoader

from lightning_moondream import MoondreamRLModule
from lightning_moondream.api import Box
from lightning_moondream.callbacks import RemoteCheckpoint
from lightning_moondream.data import DetectSample, SyntheticShapes
from lightning_moondream.data.synthetic import make_scene

SUMMARY = "train steps applied nothing"


@pytest.fixture(autouse=True)
def local_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """No key and no base URL: the local service serves."""
    monkeypatch.delenv("MOONDREAM_API_KEY", raising=False)
    monkeypatch.delenv("MOONDREAM_TUNING_URL", raising=False)


def bar_metrics(trainer: L.Trainer, model: MoondreamRLModule) -> dict[str, Any]:
    """What the progress bar shows after the metrics of the last step."""
    bar = trainer.progress_bar_callback
    assert bar is not None
    return dict(bar.get_metrics(trainer, model))


def test_one_box_run_shows_its_skipped_steps_and_says_why(tmp_path: Path) -> None:
    make_scene(3).image.save(tmp_path / "street.jpg")
    sample = DetectSample(
        image=str(tmp_path / "street.jpg"),
        object="car",
        boxes=(Box(x_min=0.1, y_min=0.2, x_max=0.4, y_max=0.6),),
    )
    model = MoondreamRLModule(name="one-box", num_rollouts=8)
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=3, logger=False, enable_checkpointing=False
    )
    with pytest.warns(UserWarning) as caught:
        trainer.fit(model, DataLoader([sample], batch_size=8, collate_fn=list))

    assert (model.train_steps, model.skipped_steps) == (0, 3)
    assert bar_metrics(trainer, model)["train/skipped_steps"] == 3.0
    summaries = [str(warning.message) for warning in caught if SUMMARY in str(warning.message)]
    assert len(summaries) == 1
    assert summaries[0].startswith(f"3 of 3 {SUMMARY} (train/skipped_steps)")
    assert "no reward spread" in summaries[0]
    assert "num_rollouts" in summaries[0] and "temperature" in summaries[0]
    assert "several objects per image" in summaries[0]


def test_the_readme_example_learns(tmp_path: Path) -> None:
    # The README's example, with fewer images and steps (seeded: the order of batches).
    L.seed_everything(0)
    model = MoondreamRLModule(name="shapes", rank=16, num_rollouts=8)
    train = DataLoader(
        SyntheticShapes("train", num_images=16, skills=("detect",)),
        batch_size=8,
        shuffle=True,
        collate_fn=list,
    )
    val = DataLoader(
        SyntheticShapes("val", num_images=2, skills=("detect",)), batch_size=8, collate_fn=list
    )
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        callbacks=[RemoteCheckpoint(monitor="val/map", mode="max", save_top_k=3, save_last=True)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train, val)

    assert model.train_steps > model.skipped_steps
    assert model.train_steps + model.skipped_steps == trainer.global_step == 4
    assert bar_metrics(trainer, model)["train/skipped_steps"] == model.skipped_steps
    assert not [warning for warning in caught if SUMMARY in str(warning.message)]
    trainer.test(model, val)
    assert "test/map" in trainer.callback_metrics
