"""YOLO text labels to annotated images.

Layouts:

- ``data.yaml`` with ``names`` (a list, or a mapping of id to name), optional ``path``
  (the root, relative to the YAML file's folder; the folder itself when ``path`` is
  absent or does not exist) and one entry per split (``train``, ``val``, ``test``, or
  any split name): a folder of images, a text file listing images (relative to the text
  file's folder), or a list of those. Entries resolve as Ultralytics resolves them: from
  the root, and an entry starting with ``../`` that does not exist there is tried without
  it, so Roboflow's ``train: ../train/images`` beside ``train/`` works;
- ``classes.txt`` (one name per line) beside ``images/`` and ``labels/``, either flat or
  with one subfolder per split (``images/train``, ``labels/train``, ...).

Split folders on disk that ``data.yaml`` does not list are splits too: ``<root>/<split>/
images`` (Roboflow) and ``<root>/images/<split>`` (Ultralytics). Split names follow
:mod:`~lightning_moondream.data.splits` (``valid`` and ``val`` are one split).

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
from lightning_moondream.data.sources.files import image_files
from lightning_moondream.data.splits import (
    choose_split,
    refuse_split,
    split_folders,
    split_kind,
)


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


def _images_in(entry: Path, where: str) -> list[Path]:
    if not entry.exists():
        raise DatasetError(
            f"{where}: {entry} does not exist; expected a folder of images or a .txt list"
        )
    if entry.is_dir():
        return image_files(entry)
    if entry.is_file() and entry.suffix == ".txt":
        base = entry.parent
        lines = [line.strip() for line in entry.read_text().splitlines() if line.strip()]
        return [
            (base / line).resolve() if not Path(line).is_absolute() else Path(line)
            for line in lines
        ]
    raise DatasetError(f"{where}: {entry} is neither a folder of images nor a .txt list of images")


def resolve_entry(base: Path, entry: str) -> Path:
    """Where a ``data.yaml`` split entry points, resolved as Ultralytics does."""
    path = Path(entry)
    if path.is_absolute():
        return path
    resolved = (base / path).resolve()
    if not resolved.exists() and entry.startswith("../"):
        resolved = (base / entry[3:]).resolve()
    return resolved


def _disk_splits(root: Path) -> dict[str, list[Path]]:
    """Split folders of images on disk: ``<split>/images`` or ``images/<split>``."""
    found = {
        name: [folder / "images"]
        for name, folder in split_folders(root).items()
        if (folder / "images").is_dir()
    }
    for name, folder in split_folders(root / "images").items():
        found.setdefault(name, [folder])
    return found


def _read_config(config_file: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(config_file.read_text())
    except OSError as exc:
        raise DatasetError(f"{config_file}: cannot read ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise DatasetError(f"{config_file}: malformed YAML ({exc})") from exc
    if not isinstance(config, dict) or "names" not in config:
        raise DatasetError(f"{config_file}: no 'names' list of classes")
    return config


def yolo_splits(root: Path) -> tuple[list[str], dict[str, list[Path]], str]:
    """Find the class names and every split's image entries.

    Args:
        root: The dataset folder, or its ``data.yaml``.

    Returns:
        The class names; each split's entries (folders or ``.txt`` lists, which may not
        exist for a split ``data.yaml`` lists); the file that defines them, for messages.
        A flat ``classes.txt`` layout has the one split ``""``.

    Raises:
        DatasetError: For a missing or malformed ``data.yaml``/``classes.txt``.
    """
    config_file = root if root.is_file() else root / "data.yaml"
    if config_file.is_file():
        config = _read_config(config_file)
        names = _names(config["names"], config_file)
        base = config_file.parent / str(config.get("path") or ".")
        if not base.is_dir():
            # A path written on another machine; the entries are relative to the YAML.
            base = config_file.parent
        entries: dict[str, list[Path]] = {}
        for key, value in config.items():
            if not isinstance(key, str) or split_kind(key) is None or not value:
                continue
            items = value if isinstance(value, list) else [value]
            entries[key] = [resolve_entry(base, str(item)) for item in items]
        listed = {path for paths in entries.values() for path in paths}
        for folder in {base, config_file.parent}:
            for name, paths in _disk_splits(folder).items():
                if name not in entries and not set(paths) & listed:
                    entries[name] = [path.resolve() for path in paths]
        return names, entries, str(config_file)
    classes_file = root / "classes.txt"
    try:
        names = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise DatasetError(f"{root}: no data.yaml or classes.txt ({exc.strerror or exc})") from exc
    per_split = _disk_splits(root)
    return names, per_split or {"": [root / "images"]}, str(classes_file)


def available_splits(root: Path) -> list[str]:
    """The splits of a YOLO dataset whose images exist (``[]`` for a flat layout)."""
    _, entries, _ = yolo_splits(root)
    return [
        name for name, paths in entries.items() if name and all(path.exists() for path in paths)
    ]


def yolo_layout(root: Path, split: str | None) -> tuple[list[str], list[Path]]:
    """Find the class names and the images of a split.

    Args:
        root: The dataset folder, or its ``data.yaml``.
        split: The split; ``None`` means the training split where there are splits
            (or the only one), else all images.

    Raises:
        DatasetError: For a missing or malformed ``data.yaml``/``classes.txt``, or a
            split that is not there.
    """
    names, entries, source = yolo_splits(root)
    if "" in entries:
        refuse_split(split, str(root / "images"))
        return names, image_files(entries[""][0])
    # Without a name, a split whose images exist; a named one is read, or its absence said.
    candidates = list(entries) if split is not None else available_splits(root) or list(entries)
    chosen = choose_split(candidates, split, source) or ""
    images = [
        path
        for entry in entries[chosen]
        for path in _images_in(entry, f"{source} split {chosen!r}")
    ]
    return names, images


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
