"""The ``lightning-moondream`` command on every config, against the in-process local service."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from builders import coco_tree, save_image, voc_devkit

from lightning_moondream.api import TuningClient
from lightning_moondream.callbacks import HeldOutReport
from lightning_moondream.cli import MoondreamCLI, main
from lightning_moondream.module import MoondreamRLModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("command_line")


def keypoints_file(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_image(root / "person.jpg", size=(100, 80))
    keypoints = [0] * 51
    keypoints[0:3] = [50, 20, 2]  # nose
    keypoints[3:6] = [45, 18, 2]  # left eye
    path = root / "keypoints.json"
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "person.jpg", "width": 100, "height": 80}],
                "annotations": [
                    {
                        "id": 1,
                        "image_id": 1,
                        "category_id": 1,
                        "bbox": [30, 10, 40, 60],
                        "keypoints": keypoints,
                        "num_keypoints": 2,
                    }
                ],
                "categories": [
                    {
                        "id": 1,
                        "name": "person",
                        "keypoints": [
                            "nose",
                            "left_eye",
                            "right_eye",
                            "left_ear",
                            "right_ear",
                            "left_shoulder",
                            "right_shoulder",
                            "left_elbow",
                            "right_elbow",
                            "left_wrist",
                            "right_wrist",
                            "left_hip",
                            "right_hip",
                            "left_knee",
                            "right_knee",
                            "left_ankle",
                            "right_ankle",
                        ],
                    }
                ],
            }
        )
    )
    return path


def vqa_manifest(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_image(root / "bus.png", size=(40, 30))
    lines = [
        {
            "image": "bus.png",
            "skill": "query",
            "question": "What colour is the bus?",
            "answers": ["red"],
        },
        {
            "image": "bus.png",
            "skill": "query",
            "question": "How many buses are there?",
            "answers": ["1", "one"],
        },
    ]
    path = root / "vqa.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path


def data_overrides(config: str, root: Path) -> list[str]:
    """Point a cloud config's data paths at tiny generated files."""
    if config in ("quickstart.yaml", "finetunes_sft.yaml"):
        return [
            "--data.train={source: synthetic, num_images: 8, skills: [detect]}",
            "--data.val={source: synthetic, num_images: 2, skills: [detect]}",
            "--data.test={source: synthetic, num_images: 2, skills: [detect]}",
        ]
    if config == "coco_detect.yaml":
        annotations = coco_tree(root / "coco")
        spec = f"{{source: {annotations}, image_root: {annotations.parent.parent / 'images'}, skill: detect}}"
        return [f"--data.train={spec}", f"--data.val={spec}"]
    if config == "voc_detect.yaml":
        devkit = voc_devkit(root / "voc")
        # Its val split has no objects; both stages read the train split.
        spec = f"{{source: {devkit}, format: voc, split: train, skill: detect}}"
        return [f"--data.train={spec}", f"--data.val={spec}"]
    if config == "coco_keypoints_point.yaml":
        path = keypoints_file(root / "keypoints")
        spec = f"{{source: {path}, image_root: {path.parent}, skill: point, keypoints: true}}"
        return [f"--data.train={spec}", f"--data.val={spec}"]
    path = vqa_manifest(root / "vqa")
    return [f"--data.train={{source: {path}}}", f"--data.val={{source: {path}}}"]


def common(config: str, root: Path) -> list[str]:
    return [
        f"--config={CONFIGS / config}",
        f"--trainer.default_root_dir={root}",
        "--data.num_workers=0",
        "--data.batch_size=2",
        "--model.num_rollouts=2",
        *data_overrides(config, root / "data"),
    ]


@pytest.mark.parametrize(
    "config",
    [
        "quickstart.yaml",
        "finetunes_sft.yaml",
        "coco_detect.yaml",
        "voc_detect.yaml",
        "coco_keypoints_point.yaml",
        "vqa_query.yaml",
    ],
)
def test_fit_then_validate_each_config(config: str, tmp_path: Path) -> None:
    fit = MoondreamCLI(["fit", *common(config, tmp_path), "--trainer.fast_dev_run=1"])
    validate = MoondreamCLI(["validate", *common(config, tmp_path), "--trainer.fast_dev_run=1"])
    assert isinstance(fit.model, MoondreamRLModule) and isinstance(
        validate.model, MoondreamRLModule
    )
    with TuningClient.local(data_dir=tmp_path / "moondream-local-service") as client:
        steps = {adapter.adapter_id: adapter.train_steps for adapter in client.adapters.iter()}
    # fit trained its adapter as far as the trainer counted (steps whose rollouts all
    # scored alike are counted apart); validate evaluated a fresh adapter of its own,
    # and deleted it when done.
    trained = fit.trainer.global_step - fit.model.skipped_steps
    assert steps == {fit.model.adapter.adapter_id: trained}
    assert any(name.startswith("val/") for name in validate.trainer.callback_metrics)


def test_quickstart_fit_writes_checkpoints_and_test_reads_them(tmp_path: Path) -> None:
    main(
        [
            "fit",
            *common("quickstart.yaml", tmp_path),
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
        ]
    )
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))
    assert {path.name for path in checkpoints} >= {"last.ckpt"}
    last = next(path for path in checkpoints if path.name == "last.ckpt")
    main(["test", *common("quickstart.yaml", tmp_path), f"--ckpt_path={last}"])
    config = next(tmp_path.rglob("config.yaml")).read_text()
    assert "quickstart-shapes" in config


def test_predict_writes_jsonl(tmp_path: Path) -> None:
    output = tmp_path / "predictions.jsonl"
    main(
        [
            "predict",
            *common("quickstart.yaml", tmp_path),
            "--data.predict={source: synthetic, num_images: 2, skills: [detect]}",
            "--trainer.callbacks+=lightning_moondream.callbacks.JsonlPredictionWriter",
            f"--trainer.callbacks.output_path={output}",
        ]
    )
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert records and all({"id", "skill", "label", "output"} <= set(record) for record in records)
    assert all(record["skill"] == "detect" and "boxes" in record["output"] for record in records)


def test_adapters_housekeeping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    local = tmp_path / "service"
    with TuningClient.local(data_dir=local) as client:
        adapter = client.adapters.create("kept", 16)
        checkpoint = client.checkpoints.save(adapter.adapter_id)
        doomed = client.adapters.create("doomed", 32)
    main(["adapters", "--local-dir", str(local), "list"])
    listing = capsys.readouterr().out
    assert adapter.adapter_id in listing and doomed.adapter_id in listing
    main(["adapters", "--local-dir", str(local), "checkpoints", adapter.adapter_id])
    assert checkpoint.ref in capsys.readouterr().out
    main(
        [
            "adapters",
            "--local-dir",
            str(local),
            "delete",
            doomed.adapter_id,
            checkpoint.ref,
        ]
    )
    with TuningClient.local(data_dir=local) as client:
        assert [a.adapter_id for a in client.adapters.iter()] == [adapter.adapter_id]
        assert list(client.checkpoints.iter(adapter.adapter_id)) == []
    with pytest.raises(SystemExit) as failed:
        main(["adapters", "--local-dir", str(local), "delete", "no-such-adapter"])
    assert failed.value.code == 1
    assert "no-such-adapter" in capsys.readouterr().err


def test_eval_config_tests_a_quickstart_adapter(tmp_path: Path) -> None:
    service = tmp_path / "service"
    with TuningClient.local(data_dir=service) as client:
        adapter = client.adapters.create("trained-elsewhere", 16)
    tested = MoondreamCLI(
        [
            "test",
            f"--config={CONFIGS / 'eval' / 'synthetic.yaml'}",
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.adapter_id={adapter.adapter_id}",
            f"--model.init_args.local_service={{data_dir: {service}}}",
            "--data.test={source: synthetic, num_images: 2, skills: [detect, point, query]}",
            "--data.num_workers=0",
        ]
    )
    assert isinstance(tested.model, MoondreamRLModule)
    assert tested.model.adapter.adapter_id == adapter.adapter_id
    metrics = tested.trainer.callback_metrics
    assert {"test/map", "test/point_f1", "test/vqa_accuracy", "test/reward"} <= set(metrics)


@pytest.mark.slow
def test_the_quickstart_improves_held_out_reward_and_map(tmp_path: Path) -> None:
    run = MoondreamCLI(
        ["fit", f"--config={CONFIGS / 'quickstart.yaml'}", f"--trainer.default_root_dir={tmp_path}"]
    )
    assert run.trainer.global_step == 40
    [report] = [
        callback for callback in run.trainer.callbacks if isinstance(callback, HeldOutReport)
    ]
    assert report.after["samples"] == report.before["samples"] > 0
    assert report.after["reward"] > report.before["reward"]
    assert report.after["map"] > report.before["map"]


def test_sft_warmup_cosine_lr_and_cloud_metrics_from_the_yaml_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the config's CSV logger writes under runs/
    cli = MoondreamCLI(
        [
            "fit",
            *common("finetunes_sft.yaml", tmp_path),
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=4",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            "--model.sft_warmup_steps=2",
            "--model.lr_scheduler.init_args.T_max=4",
        ]
    )
    finetune = cli.model.adapter.adapter_id
    with TuningClient.local(data_dir=tmp_path / "moondream-local-service") as client:
        rows = client.metrics.read(finetune)
        assert client.adapters.get(finetune).train_steps == 4 - cli.model.skipped_steps
    logged: dict[str, dict[int, float]] = {}
    for row in rows:
        logged.setdefault(row["name"], {})[row["step"]] = row["value"]
    # The cosine schedule from 0.003 to 0.0003 over 4 steps, one lr per train step.
    assert list(logged["lr-SGD"].values()) == pytest.approx(
        [0.0003 + 0.0027 * (1 + math.cos(math.pi * step / 4)) / 2 for step in range(4)]
    )
    # Two SFT warm-up steps (no rollouts), then RL steps that also teach part of the batch.
    assert sorted(logged["train/sft_loss"]) == sorted(logged["train/groups"])
    assert len(logged["train/reward_mean"]) == 2
    assert "val/map" in logged
