"""YOLO text labels to annotated images.

Layouts:

- ``data.yaml`` with ``names`` (a list, or a mapping of id to name), optional ``path``
  (the root, relative to the YAML file) and one entry per split (``train``, ``val``,
  ``test``): a folder of images, a text file listing images, or a list of those;
- ``classes.txt`` (one name per line) beside ``images/`` and ``labels/``, either flat or
  with one subfolder per split (``images/train``, ``labels/train``, ...).

Each image's labels are in the file of the same stem under the matching ``labels``
folder (the last ``images`` component of the path replaced by ``labels``); an image
without a label file has no objects. A line is ``class cx cy w h`` normalized to the
image, or ``class x1 y1 x2 y2 ...`` (a segmentation polygon, whose bounding box is
taken).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_moondream.api.models import Box
from lightning_moondream.data.errors import DatasetError
from lightning_moondream.data.geometry import check_normalized_box
from lightning_moondream.data.records import AnnotatedImage
from lightning_moondream.data.sources.files import IMAGE_SUFFIXES

SPLITS = ("train", "val", "test")


def is_yolo(root: Path) -> bool:
    """Tell whether ``root`` is a YOLO dataset folder (or its ``data.yaml``)."""
    if root.is_file():
        return root.suffix in (".yaml", ".yml")
    return (root / "data.yaml").is_file() or (
        (root / "classes.txt").is_file() and (root / "images").is_dir()
    )


def _names(value: Any, source: Path) -> list[str]:
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return list(value)
    if isinstance(value, dict):
        try:
            ids = sorted(int(key) for key in value)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{source}: 'names' keys must be class ids") from exc
        if ids != list(range(len(ids))):
            raise DatasetError(f"{source}: 'names' ids must run from 0 to {len(ids) - 1}")
        return [str(value.get(i, value.get(str(i)))) for i in ids]
    raise DatasetError(f"{source}: 'names' must be a list of class names or an id-to-name mapping")


def _images_in(entry: Path, source: Path) -> list[Path]:
    if entry.is_dir():
        return sorted(path for path in entry.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    if entry.is_file() and entry.suffix == ".txt":
        base = entry.parent
        lines = [line.strip() for line in entry.read_text().splitlines() if line.strip()]
        return [
            (base / line).resolve() if not Path(line).is_absolute() else Path(line)
            for line in lines
        ]
    raise DatasetError(f"{source}: split entry {entry} is neither a folder of images nor a list")


def yolo_layout(root: Path, split: str | None) -> tuple[list[str], list[Path]]:
    """Find the class names and the images of a split.

    Args:
        root: The dataset folder, or its ``data.yaml``.
        split: The split; ``None`` means ``train`` where there are splits, else all.

    Raises:
        DatasetError: For a missing or malformed ``data.yaml``/``classes.txt``, or a
            split that is not there.
    """
    config_file = root if root.is_file() else root / "data.yaml"
    if config_file.is_file():
        try:
            config = yaml.safe_load(config_file.read_text())
        except yaml.YAMLError as exc:
            raise DatasetError(f"{config_file}: malformed YAML ({exc})") from exc
        if not isinstance(config, dict) or "names" not in config:
            raise DatasetError(f"{config_file}: no 'names' list of classes")
        names = _names(config["names"], config_file)
        base = config_file.parent / str(config.get("path") or ".")
        wanted = split or "train"
        entry = config.get(wanted)
        if entry is None:
            available = [key for key in SPLITS if config.get(key)]
            raise DatasetError(
                f"{config_file}: no split {wanted!r}; available: {', '.join(available)}"
            )
        entries = entry if isinstance(entry, list) else [entry]
        images = [path for item in entries for path in _images_in(base / str(item), config_file)]
        return names, images
    classes_file = root / "classes.txt"
    try:
        names = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise DatasetError(f"{root}: no data.yaml or classes.txt ({exc.strerror or exc})") from exc
    per_split = [name for name in SPLITS if (root / "images" / name).is_dir()]
    if per_split:
        wanted = split or "train"
        if wanted not in per_split:
            raise DatasetError(
                f"{root / 'images'}: no split {wanted!r}; available: {', '.join(per_split)}"
            )
        return names, _images_in(root / "images" / wanted, classes_file)
    if split is not None:
        raise DatasetError(
            f"{root / 'images'}: no split folders, so split {split!r} cannot be chosen"
        )
    return names, _images_in(root / "images", classes_file)


def label_path(image: Path) -> Path:
    """The label file of an image: its last ``images`` folder replaced by ``labels``."""
    parts = list(image.parts)
    for position in range(len(parts) - 2, -1, -1):
        if parts[position] == "images":
            parts[position] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def parse_label_file(
    path: Path, names: Sequence[str], *, strict: bool = False
) -> tuple[list[Box], list[str]]:
    """Read one label file; a missing file means no objects.

    Raises:
        DatasetError: Naming the file and line, for a malformed line or a class id out
            of range (e.g. ``labels/img3.txt line 2: class id 7 not in 3 classes``).
    """
    if not path.is_file():
        return [], []
    boxes: list[Box] = []
    labels: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path} line {number}"
        try:
            class_id = int(fields[0])
            values = [float(field) for field in fields[1:]]
        except ValueError as exc:
            raise DatasetError(
                f"{where}: expected 'class cx cy w h', got {line.strip()!r}"
            ) from exc
        if not 0 <= class_id < len(names):
            raise DatasetError(f"{where}: class id {class_id} not in {len(names)} classes")
        if len(values) == 4:
            cx, cy, width, height = values
            xyxy = (cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2)
        elif len(values) >= 6 and len(values) % 2 == 0:
            xs, ys = values[0::2], values[1::2]
            xyxy = (min(xs), min(ys), max(xs), max(ys))
        else:
            raise DatasetError(
                f"{where}: expected 4 box values or an even number of polygon values, got {len(values)}"
            )
        box = check_normalized_box(xyxy, where=where, strict=strict)
        if box is not None:
            boxes.append(box)
            labels.append(names[class_id])
    return boxes, labels


def read_yolo(
    root: str | Path, split: str | None = None, *, strict: bool = False
) -> tuple[list[AnnotatedImage], list[str]]:
    """Read a YOLO dataset split.

    Args:
        root: The dataset folder or its ``data.yaml``.
        split: The split; ``None`` means ``train`` where there are splits, else all.
        strict: Refuse boxes outside the image or without area instead of clamping or
            dropping them with a warning.

    Raises:
        DatasetError: Naming the file and line of any malformed annotation.
    """
    names, image_paths = yolo_layout(Path(root), split)
    images = []
    for image in image_paths:
        boxes, labels = parse_label_file(label_path(image), names, strict=strict)
        images.append(AnnotatedImage(str(image), tuple(boxes), tuple(labels), image.name))
    return images, names
