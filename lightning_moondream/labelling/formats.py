"""Predicted labels written as labelling tools read them: COCO JSON, YOLO, Label Studio.

Each format is written to a folder of its own that holds its images (hard links where
the file system allows, copies otherwise) under ``images/``, with the same relative paths
as in the labelled folder, so the folder is a dataset that ``load_dataset`` reads back:

- ``coco``: ``annotations.json`` (boxes in pixels, ``[x, y, width, height]``);
- ``yolo``: ``labels/<path>.txt`` (``class cx cy w h``, normalized) and ``data.yaml``;
- ``labelstudio``: ``tasks.json``, one task per image with its boxes and points as
  ``predictions`` (pre-annotations) whose ``model_version`` is the model that made them,
  and images referenced as Label Studio's local files storage serves them
  (``/data/local-files/?d=images/<path>``).

COCO and YOLO detection files hold boxes only; points are written to Label Studio.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from lightning_moondream.api.models import Box, Point
from lightning_moondream.data.records import AnnotatedImage

LABEL_FORMATS = ("coco", "yolo", "labelstudio")
"""Formats :func:`write_labels` writes."""

IMAGES_FOLDER = "images"


def write_labels(
    images: Sequence[AnnotatedImage],
    classes: Sequence[str],
    folder: str | Path,
    format: str,
    *,
    model_version: str,
) -> Path:
    """Write labelled images in one format, with their images, to ``folder``.

    Args:
        images: Labelled images; ``image`` is the file, ``id`` its relative path (POSIX),
            ``size`` its displayed ``(width, height)``.
        classes: Every class name, in the order of class ids.
        folder: The dataset folder to write (created; files of the format replaced).
        format: One of :data:`LABEL_FORMATS`.
        model_version: The model that made the labels, recorded where the format can.

    Returns:
        The file a reader starts from (``annotations.json``, ``data.yaml``, ``tasks.json``).

    Raises:
        ValueError: For an unknown format, or points asked of a format without them.
    """
    writers: dict[str, Callable[[Sequence[AnnotatedImage], Sequence[str], Path, str], Path]] = {
        "coco": _write_coco,
        "yolo": _write_yolo,
        "labelstudio": _write_label_studio,
    }
    if format not in writers:
        raise ValueError(f"format must be one of {', '.join(LABEL_FORMATS)}, got {format!r}")
    if format != "labelstudio" and any(image.points for image in images):
        raise ValueError(f"{format} detection files hold boxes only; write points as labelstudio")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    _place_images(images, root / IMAGES_FOLDER)
    return writers[format](images, classes, root, model_version)


def _place_images(images: Sequence[AnnotatedImage], folder: Path) -> None:
    for image in images:
        target = folder / _relative(image)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        source = Path(str(image.image))
        try:
            os.link(source, target)
        except OSError:
            # Another file system, or links not allowed: a copy is the same dataset.
            shutil.copyfile(source, target)


def _relative(image: AnnotatedImage) -> PurePosixPath:
    relative = PurePosixPath(image.id)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"image id {image.id!r} must be a relative path inside the folder")
    return relative


def _size(image: AnnotatedImage) -> tuple[int, int]:
    if image.size is None:
        raise ValueError(f"image {image.id!r} has no size: labels need the image's pixel size")
    return image.size


def _write_coco(
    images: Sequence[AnnotatedImage], classes: Sequence[str], root: Path, model_version: str
) -> Path:
    category = {name: index + 1 for index, name in enumerate(classes)}
    entries: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, image in enumerate(images, start=1):
        width, height = _size(image)
        entries.append(
            {"id": image_id, "file_name": str(_relative(image)), "width": width, "height": height}
        )
        for box, label in zip(image.boxes, image.labels, strict=True):
            x, y = box.x_min * width, box.y_min * height
            w, h = (box.x_max - box.x_min) * width, (box.y_max - box.y_min) * height
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category[label],
                    "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                    "area": round(w * h, 2),
                    "iscrowd": 0,
                }
            )
    document = {
        "info": {"description": f"Predictions of {model_version}"},
        "images": entries,
        "annotations": annotations,
        "categories": [
            {"id": index, "name": name, "supercategory": "none"} for name, index in category.items()
        ],
    }
    return _write_json(root / "annotations.json", document)


def _write_yolo(
    images: Sequence[AnnotatedImage], classes: Sequence[str], root: Path, model_version: str
) -> Path:
    class_id = {name: index for index, name in enumerate(classes)}
    for image in images:
        lines = [
            f"{class_id[label]} {_yolo_box(box)}\n"
            for box, label in zip(image.boxes, image.labels, strict=True)
        ]
        path = (root / "labels" / _relative(image)).with_suffix(".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(lines), encoding="utf-8")
    config = {"path": ".", "train": IMAGES_FOLDER, "val": IMAGES_FOLDER, "names": list(classes)}
    path = root / "data.yaml"
    header = f"# Predictions of {model_version}\n"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _yolo_box(box: Box) -> str:
    width, height = box.x_max - box.x_min, box.y_max - box.y_min
    centre_x, centre_y = box.x_min + width / 2, box.y_min + height / 2
    return " ".join(f"{value:.6f}" for value in (centre_x, centre_y, width, height))


def _write_label_studio(
    images: Sequence[AnnotatedImage], classes: Sequence[str], root: Path, model_version: str
) -> Path:
    tasks = []
    for image in images:
        width, height = _size(image)
        regions = [
            _box_region(box, label) for box, label in zip(image.boxes, image.labels, strict=True)
        ] + [
            _point_region(point, label)
            for point, label in zip(image.points, image.point_labels, strict=True)
        ]
        for index, region in enumerate(regions):
            region.update(
                id=f"r{index}",
                from_name="label",
                to_name="image",
                original_width=width,
                original_height=height,
                image_rotation=0,
            )
        reference = f"/data/local-files/?d={IMAGES_FOLDER}/{_relative(image)}"
        tasks.append(
            {
                "data": {"image": reference},
                "predictions": [{"model_version": model_version, "result": regions}],
            }
        )
    return _write_json(root / "tasks.json", tasks)


def _box_region(box: Box, label: str) -> dict[str, Any]:
    value = {
        "x": box.x_min * 100,
        "y": box.y_min * 100,
        "width": (box.x_max - box.x_min) * 100,
        "height": (box.y_max - box.y_min) * 100,
        "rotation": 0,
        "rectanglelabels": [label],
    }
    return {"type": "rectanglelabels", "value": value}


def _point_region(point: Point, label: str) -> dict[str, Any]:
    value = {"x": point.x * 100, "y": point.y * 100, "width": 0.5, "keypointlabels": [label]}
    return {"type": "keypointlabels", "value": value}


def _write_json(path: Path, document: Any) -> Path:
    # Written beside and renamed, so a reader never sees half a file.
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(document, indent=1), encoding="utf-8")
    partial.replace(path)
    return path
