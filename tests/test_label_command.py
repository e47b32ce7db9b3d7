"""``lightning-moondream label`` end to end on the local service: labels that load back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from builders import yolo_tree
from test_evaluate_models import train_and_save

from lightning_moondream.api import TuningClient
from lightning_moondream.cli import main
from lightning_moondream.data import load_dataset
from lightning_moondream.data.synthetic import detect_tasks, make_scene, split_seed
from lightning_moondream.labelling import PROGRESS_FILE


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A folder of synthetic scenes, their phrases, and a finetune with two checkpoints."""
    root = tmp_path_factory.mktemp("label")
    images = root / "images"
    images.mkdir()
    phrases: list[str] = []
    for index in range(4):
        scene = make_scene(split_seed("test", index))
        scene.image.save(images / f"scene{index}.jpg", quality=95)
        phrases += [phrase for phrase, _ in detect_tasks(scene) if phrase not in phrases]
    with TuningClient.local(data_dir=root / "service", dialect="finetunes") as client:
        finetune = client.adapters.create("labeller", rank=16).adapter_id
        train_and_save(client, finetune, 2)
    return {"root": root, "images": images, "classes": phrases[:2], "finetune": finetune}


def label(trained: dict[str, Any], out: Path, *options: str) -> int | str | None:
    command = ["label", "--local-dir", str(trained["root"] / "service"), "--output", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main([*command, *options])
    return exit_info.value.code


def boxes_by_image(samples: Any) -> dict[tuple[str, str], list[tuple[float, ...]]]:
    return {
        (Path(str(sample.image)).name, sample.object): sorted(
            tuple(round(value, 3) for value in box.as_tuple()) for box in sample.boxes
        )
        for sample in samples
        if sample.boxes
    }


def test_a_checkpoint_labels_a_folder_and_the_labels_load_back(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = f"{trained['finetune']}@2"
    status = label(
        trained,
        tmp_path / "out",
        *("--model", model, "--images", str(trained["images"])),
        *("--classes", ",".join(trained["classes"]), "--format", "coco,yolo,labelstudio"),
        "--no-progress",
    )
    assert status == 0
    assert "labelled 4 images (0 done by an earlier run)" in capsys.readouterr().out
    header, *lines = [json.loads(line) for line in (tmp_path / "out" / PROGRESS_FILE).open()]
    assert header["model"] == f"moondream3-preview/{trained['finetune']}@2"
    answered = {
        (Path(line["id"]).name, name): sorted(tuple(round(v, 3) for v in box) for box in boxes)
        for line in lines
        for name, boxes in line["objects"].items()
        if boxes
    }
    assert answered, "the checkpoint found nothing to label"
    for format in ("coco", "yolo", "labelstudio"):
        assert boxes_by_image(load_dataset(tmp_path / "out" / format, format=format)) == answered
    tasks = json.loads(next((tmp_path / "out" / "labelstudio").glob("*.json")).read_text())
    assert {item["model_version"] for task in tasks for item in task["predictions"]} == {
        header["model"]
    }

    # Again into the same folder: nothing is asked twice.
    assert (
        label(
            trained,
            tmp_path / "out",
            "--model",
            model,
            "--images",
            str(trained["images"]),
            "--classes",
            ",".join(trained["classes"]),
            "--format",
            "coco",
            "--no-progress",
        )
        == 0
    )
    assert "labelled 0 images (4 done by an earlier run)" in capsys.readouterr().out


def test_a_dataset_is_labelled_with_its_own_classes_by_an_adapter(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "first"
    assert (
        label(
            trained,
            first,
            "--model",
            "base",
            "--images",
            str(trained["images"]),
            "--classes",
            ",".join(trained["classes"]),
            "--no-progress",
        )
        == 0
    )
    status = label(
        trained,
        tmp_path / "second",
        *("--model", trained["finetune"], "--data", str(first / "coco"), "--data-format", "coco"),
        "--no-progress",
    )
    assert status == 0, capsys.readouterr().err
    header = json.loads((tmp_path / "second" / PROGRESS_FILE).open().readline())
    assert header["model"] == trained["finetune"]
    assert set(header["classes"]) <= set(trained["classes"]) and header["classes"]


def test_a_missing_model_is_named_with_what_exists(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    finetune = trained["finetune"]
    status = label(
        trained,
        tmp_path / "out",
        *("--model", f"{finetune}@9", "--images", str(trained["images"]), "--classes", "x"),
    )
    assert status == 1
    error = capsys.readouterr().err
    assert f"no checkpoint at step 9; {finetune} keeps: {finetune}@1 (step 1)" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("split", "labelled"), [(None, ["x.jpg", "y.png"]), ("val", ["z.jpg"])])
def test_a_dataset_split_is_labelled_the_training_one_by_default(
    trained: dict[str, Any], tmp_path: Path, split: str | None, labelled: list[str]
) -> None:
    (tmp_path / "yolo").mkdir()
    data = yolo_tree(tmp_path / "yolo")
    chosen = () if split is None else ("--split", split)
    options = ("--model", "base", "--data", str(data), *chosen, "--no-progress")
    assert label(trained, tmp_path / "out", *options) == 0
    entries = [json.loads(line) for line in (tmp_path / "out" / PROGRESS_FILE).open()][1:]
    assert sorted({Path(entry["id"]).name for entry in entries}) == labelled


def test_a_split_of_a_folder_of_images_is_refused(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = ("--model", "base", "--images", str(trained["images"]), "--classes", "x")
    assert label(trained, tmp_path / "out", *options, "--split", "val") == 1
    assert "--split chooses a split of --data, not of --images" in capsys.readouterr().err
