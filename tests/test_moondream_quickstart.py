"""Moondream's own finetuning quickstart recipe, as a config, on data of the same shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from builders import save_image

from lightning_moondream.api import TuningClient
from lightning_moondream.cli import MoondreamCLI

datasets = pytest.importorskip("datasets")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "moondream_quickstart.yaml"
CLASSES = ("rock", "paper", "scissors")


pytestmark = pytest.mark.usefixtures("command_line")


def rps_dataset(root: Path) -> Path:
    """A saved DatasetDict like moondream/rps-finetune: ``image`` and ``class``, train/valid."""

    def split(count: int, offset: int) -> datasets.Dataset:
        paths, labels = [], []
        for index in range(count):
            label = CLASSES[(index + offset) % 3]
            shade = 60 * CLASSES.index(label)
            paths.append(
                str(
                    save_image(
                        root / "img" / f"{offset}_{index}.png", (32, 32), (shade, 90, 200 - shade)
                    )
                )
            )
            labels.append(label)
        table = datasets.Dataset.from_dict({"image": paths, "class": labels})
        return table.cast_column("image", datasets.Image())

    folder = root / "rps"
    datasets.DatasetDict({"train": split(9, 0), "valid": split(4, 1)}).save_to_disk(folder)
    return folder


def test_the_recipe_trains_rank_8_with_its_settings_and_evaluates_greedily(tmp_path: Path) -> None:
    recipe = yaml.safe_load(CONFIG.read_text())
    model = recipe["model"]["init_args"]
    assert (model["rank"], model["num_rollouts"], model["lr"], model["reward"]) == (
        8,
        4,
        2e-4,
        "exact_match",
    )
    assert (
        model["train_settings"]["max_tokens"] == 4 and model["eval_settings"]["temperature"] == 0.0
    )

    folder = rps_dataset(tmp_path / "data")
    source = f"--data.train.source={folder}"
    cli = MoondreamCLI(
        [
            "fit",
            f"--config={CONFIG}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--data.num_workers=0",
            source,
            f"--data.val.source={folder}",
        ]
    )
    data = cli.datamodule
    # The recipe trains on `train` and evaluates on `valid`, asking its one question.
    assert len(data.datasets["train"]) == 9 and len(data.datasets["val"]) == 4
    sample = data.datasets["val"][0]
    assert sample.question.startswith("Is this rock, paper, or scissors?")
    assert sample.answers[0] in CLASSES
    assert "val/vqa_accuracy" in cli.trainer.callback_metrics
    with TuningClient.local(data_dir=tmp_path / "moondream-local-service") as client:
        (finetune,) = list(client.adapters.iter())
    assert finetune.rank == 8
