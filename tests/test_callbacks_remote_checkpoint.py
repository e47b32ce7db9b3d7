"""``RemoteCheckpoint``: the API checkpoints kept are exactly those the kept files hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from support import alternating_reward, detect_samples, loader, quiet_trainer

from lightning_moondream.api import TuningClient
from lightning_moondream.callbacks import RemoteCheckpoint
from lightning_moondream.module import CHECKPOINT_KEY, MoondreamRLModule


def fit(root: Path, checkpoints: RemoteCheckpoint, **options: Any) -> MoondreamRLModule:
    model = MoondreamRLModule(
        num_rollouts=2,
        reward=alternating_reward(),
        local_service={"data_dir": str(root / "service"), "policy": "constant"},
        dialect="adapters",
    )
    run = quiet_trainer(root, enable_checkpointing=True, callbacks=[checkpoints], **options)
    run.fit(
        model, loader(detect_samples("train", 8), batch_size=2), loader(detect_samples("val", 2))
    )
    return model


def held(folder: Path) -> dict[str, str]:
    """The API checkpoint each kept file holds, by file name."""
    return {
        path.name: torch.load(path, weights_only=False)[CHECKPOINT_KEY]["checkpoint_id"]
        for path in sorted(folder.glob("*.ckpt"))
    }


def remote(root: Path, model: MoondreamRLModule) -> list[str]:
    with TuningClient.local(data_dir=root / "service", dialect="adapters") as client:
        return sorted(c.ref for c in client.checkpoints.iter(model.adapter.adapter_id))


def test_files_of_one_step_share_one_api_checkpoint(tmp_path: Path) -> None:
    checkpoints = RemoteCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=1, save_last=True
    )
    model = fit(tmp_path, checkpoints, max_steps=3)
    files = held(tmp_path / "ckpt")
    assert sorted(files) == ["epoch=0-step=3.ckpt", "last.ckpt"]
    assert len(set(files.values())) == 1
    # The API checkpoints of steps 1 and 2 went with their files.
    assert remote(tmp_path, model) == sorted(set(files.values()))
    assert checkpoints.api_checkpoints == {
        str(tmp_path / "ckpt" / name): ref for name, ref in files.items()
    }


@pytest.mark.parametrize("monitor", [None, "val/reward"])
def test_a_file_written_again_in_place_drops_its_old_api_checkpoint(
    tmp_path: Path, monitor: str | None
) -> None:
    checkpoints = RemoteCheckpoint(
        dirpath=tmp_path / "ckpt",
        filename="best",
        monitor=monitor,
        mode="min",
        save_top_k=1,
        enable_version_counter=False,
        every_n_train_steps=1 if monitor is None else None,
    )
    options = {"val_check_interval": 1, "check_val_every_n_epoch": None, "limit_val_batches": 1}
    model = fit(tmp_path, checkpoints, max_steps=3, **options)
    files = held(tmp_path / "ckpt")
    assert list(files) == ["best.ckpt"]
    assert remote(tmp_path, model) == [files["best.ckpt"]]
    assert checkpoints.best_api_checkpoint_id == files["best.ckpt"]
