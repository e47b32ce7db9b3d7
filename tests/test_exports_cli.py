"""Exports named on the command line: ``fit`` trains on them, ``evaluate`` scores them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from exports import (
    cvat_export,
    label_studio_export,
    labelme_folder,
    roboflow_coco,
    roboflow_yolo,
    voc_split_folders,
)
from test_cli import CONFIGS

from lightning_moondream.api import TuningClient
from lightning_moondream.cli import MoondreamCLI, main

pytestmark = pytest.mark.usefixtures("command_line")


def label_studio_source(root: Path) -> str:
    export, pictures = label_studio_export(root)
    return f"{{source: {export}, image_root: {pictures}}}"


SOURCES = {
    "yolo": lambda root: str(roboflow_yolo(root)),
    "coco": lambda root: str(roboflow_coco(root)),
    "voc": lambda root: str(voc_split_folders(root)),
    "cvat": lambda root: str(cvat_export(root)),
    "labelstudio": label_studio_source,
    "labelme": lambda root: str(labelme_folder(root)),
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_fit_trains_on_an_export_named_for_train_and_val(kind: str, tmp_path: Path) -> None:
    source = SOURCES[kind](tmp_path / kind)
    cli = MoondreamCLI(
        [
            "fit",
            f"--config={CONFIGS / 'quickstart.yaml'}",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--data.train={source}",
            f"--data.val={source}",
            "--data.test=null",
            "--data.num_workers=0",
            "--data.batch_size=2",
            "--model.num_rollouts=2",
            "--trainer.fast_dev_run=1",
        ]
    )
    metrics = cli.trainer.callback_metrics
    # Rollouts ran on the export's images; a step is sent when a group's rewards differ.
    assert 0.0 <= float(metrics["train/reward_mean"]) <= 1.0
    assert "val/reward" in metrics
    with TuningClient.local(data_dir=tmp_path / "run" / "moondream-local-service") as client:
        steps = [adapter.train_steps for adapter in client.adapters.iter()]
    assert steps == [cli.trainer.global_step - cli.model.skipped_steps]


def test_evaluate_names_each_export_by_folder_and_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sources = {kind: build(tmp_path / kind) for kind, build in SOURCES.items()}
    out = tmp_path / "out"
    arguments = ["evaluate", "--model", "base", "--local-dir", str(tmp_path / "service")]
    for source in sources.values():
        arguments += ["--data", source]
    arguments += ["--out", str(out), "--batch-size", "4", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())["rows"]
    # Validation split where there is one (data.yaml's val, Roboflow's valid/), else
    # the only data; Label Studio's export is named by its folder.
    assert [(row["dataset"], row["samples"]) for row in rows] == [
        ("yolo (val)", 1),
        ("coco (valid)", 1),
        ("voc (valid)", 1),
        ("cvat", 2),
        ("export", 3),
        ("labelme", 3),
    ]
    assert "| yolo (val) | base |" in capsys.readouterr().out
