"""Auto-labelling: labels written in each format load back with the same boxes; runs resume."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
from builders import save_image

from lightning_moondream.api.models import Box, Point
from lightning_moondream.data import load_dataset
from lightning_moondream.labelling import (
    PROGRESS_FILE,
    LabellingError,
    label_images,
)

CLASSES = ("cat", "dog")


def _folder(root: Path, count: int = 4) -> Path:
    folder = root / "photos"
    for index in range(count):
        path = folder / ("sub" if index % 2 else "") / f"img{index}.jpg"
        save_image(path, (120 + index, 80), color=(40 * index, 90, 200 - 30 * index))
    return folder


class _Model:
    """A deterministic stand-in model: a box per class whose place depends on the image."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_after = fail_after

    async def __call__(self, data_url: str, name: str) -> list[Box]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise ConnectionError("service went away")
        self.calls.append((data_url[:64], name))
        if name == "dog" and zlib.crc32(data_url.encode()) % 2:
            return []
        offset = 0.1 if name == "cat" else 0.5
        return [Box(x_min=offset, y_min=0.2, x_max=offset + 0.3, y_max=0.7)]


def _loaded(path: Path, format: str) -> dict[tuple[str, str], list[tuple[float, ...]]]:
    """Every (image, class) of a dataset and its boxes, as ``load_dataset`` gives them."""
    samples = load_dataset(path, format=format, negative_rate=1.0)
    return {
        (Path(str(sample.image)).name, sample.object): sorted(
            tuple(round(value, 3) for value in box.as_tuple()) for box in sample.boxes
        )
        for sample in samples
    }


@pytest.mark.parametrize("format", ["coco", "yolo", "labelstudio"])
def test_written_labels_load_back_with_the_same_boxes(tmp_path: Path, format: str) -> None:
    model = _Model()
    run = label_images(
        _folder(tmp_path), CLASSES, model, tmp_path / "out", model_version="m@3", formats=[format]
    )
    assert run.labelled == 4 and run.resumed == 0
    progress = [json.loads(line) for line in (tmp_path / "out" / PROGRESS_FILE).open()]
    expected = {
        (Path(entry["id"]).name, name): sorted(
            tuple(round(value, 3) for value in box) for box in boxes
        )
        for entry in progress[1:]
        for name, boxes in entry["objects"].items()
    }
    assert len(expected) == 4 * len(CLASSES)
    assert any(expected.values()) and not all(expected.values())
    if format == "labelstudio":
        # A Label Studio export names only the classes its regions use.
        found = {name for (_, name), boxes in expected.items() if boxes}
        expected = {key: boxes for key, boxes in expected.items() if key[1] in found}
    assert _loaded(run.files[format].parent, format) == expected


def test_label_studio_predictions_name_the_model(tmp_path: Path) -> None:
    run = label_images(
        _folder(tmp_path, 1),
        CLASSES,
        _Model(),
        tmp_path / "out",
        model_version="moondream3-preview/ft1@8",
        formats=["labelstudio"],
    )
    tasks = json.loads(run.files["labelstudio"].read_text())
    assert tasks[0]["predictions"][0]["model_version"] == "moondream3-preview/ft1@8"
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=images/img0.jpg"


def test_points_are_written_as_label_studio_keypoints(tmp_path: Path) -> None:
    async def point(data_url: str, name: str) -> list[Point]:
        return [Point(x=0.25, y=0.75)]

    def label(count: int, format: str):
        return label_images(
            _folder(tmp_path, count),
            ["cat"],
            point,
            tmp_path / format,
            model_version="base",
            skill="point",
            formats=[format],
        )

    run = label(2, "labelstudio")
    samples = load_dataset(run.files["labelstudio"].parent, skill="point")
    assert [(sample.object, sample.points) for sample in samples] == [
        ("cat", (Point(x=0.25, y=0.75),))
    ] * 2
    with pytest.raises(ValueError, match="points: labelstudio only"):
        label(1, "coco")


def test_a_stopped_run_resumes_without_asking_again_for_images_done(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    with pytest.raises(LabellingError, match="run again to go on"):
        label_images(
            folder,
            CLASSES,
            _Model(fail_after=4),
            tmp_path / "out",
            model_version="m@3",
            max_concurrency=1,
        )
    lines = (tmp_path / "out" / PROGRESS_FILE).read_text().splitlines()
    assert len(lines) == 1 + 2  # the header and the two images answered before the failure
    # A line cut short by a crash is dropped, and its image asked again.
    with (tmp_path / "out" / PROGRESS_FILE).open("a") as file:
        file.write('{"id": "img2.jpg", "si')
    model = _Model()
    run = label_images(folder, CLASSES, model, tmp_path / "out", model_version="m@3")
    assert (run.resumed, run.labelled) == (2, 2)
    assert len(model.calls) == 2 * len(CLASSES)
    assert len(_loaded(run.files["coco"].parent, "coco")) == 4 * len(CLASSES)


def test_an_output_folder_of_another_model_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path, 1)
    label_images(folder, CLASSES, _Model(), tmp_path / "out", model_version="m@3")
    with pytest.raises(LabellingError, match="another run"):
        label_images(folder, CLASSES, _Model(), tmp_path / "out", model_version="m@4")


@pytest.mark.parametrize(
    ("images", "classes", "formats", "error", "named"),
    [
        pytest.param("photos", [], ["coco"], ValueError, "classes", id="no-classes"),
        pytest.param("photos", CLASSES, ["pascal"], ValueError, "formats", id="unknown-format"),
        pytest.param("nope", CLASSES, ["coco"], LabellingError, "not a folder", id="no-folder"),
    ],
)
def test_bad_arguments_are_refused_by_name(
    tmp_path: Path,
    images: str,
    classes: list[str],
    formats: list[str],
    error: type[Exception],
    named: str,
) -> None:
    assert _folder(tmp_path, 1) == tmp_path / "photos"
    with pytest.raises(error, match=named):
        label_images(
            tmp_path / images, classes, _Model(), tmp_path / "o", model_version="m", formats=formats
        )


def test_a_garbled_line_costs_only_its_own_image_on_resume(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    label_images(folder, CLASSES, _Model(), tmp_path / "out", model_version="m@3")
    progress = tmp_path / "out" / PROGRESS_FILE
    header, *entries = progress.read_text().splitlines(keepends=True)
    progress.write_text(header + entries[0] + "not json\n" + "".join(entries[1:]))
    model = _Model()
    run = label_images(folder, CLASSES, model, tmp_path / "out", model_version="m@3")
    assert (run.resumed, run.labelled, len(model.calls)) == (4, 0, 0)
    # A file a run created and left empty is started afresh.
    progress.write_text("")
    run = label_images(folder, CLASSES, _Model(), tmp_path / "out", model_version="m@3")
    assert (run.resumed, run.labelled) == (0, 4)
