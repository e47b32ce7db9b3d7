"""LabelMe per-image JSON files to annotated images.

Each JSON file (``shapes``, ``imagePath``, ``imageData``, ``imageWidth``,
``imageHeight``) describes one image: ``imagePath`` is relative to the JSON's folder;
when that file is missing, the base64 ``imageData`` embedded in the JSON is used. Shapes
are in pixels of the displayed image, by ``shape_type``:

- ``rectangle``: two opposite corners, in any order;
- ``polygon``, ``linestrip``, ``line``: the box around the points;
- ``circle``: the centre and a point on the circle;
- ``mask``: the two corners of the mask's box;
- ``point``: a keypoint.

Other shape types are skipped with a warning (refused when ``strict``). A folder is read
with every LabelMe JSON under it, in path order.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_moondream.data.errors import DatasetError, warn
from lightning_moondream.data.records import AnnotatedImage, AnnotationCollector
from lightning_moondream.data.sources.files import header_size, missing_image, read_json, sniff_json
from lightning_moondream.data.sources.shapes import bounding_box
from lightning_moondream.images import ImageError, ImageInput, displayed_size

_BOXED = ("rectangle", "polygon", "linestrip", "line", "mask")


def labelme_files(path: Path) -> list[Path]:
    """The LabelMe JSON files of ``path`` (the file itself, or every one under a folder)."""
    if path.is_file():
        return [path] if path.suffix == ".json" and sniff_json(path) == "labelme" else []
    return [file for file in sorted(path.rglob("*.json")) if sniff_json(file) == "labelme"]


def find_labelme(path: Path) -> Path | None:
    """``path`` if it is a LabelMe JSON, or a folder of them (directly or one level down)."""
    if path.is_file():
        return path if labelme_files(path) else None
    first = next(iter(sorted([*path.glob("*.json"), *path.glob("*/*.json")])), None)
    return path if first is not None and sniff_json(first) == "labelme" else None


def _image(entry: Mapping[str, Any], source: Path, strict: bool) -> ImageInput | None:
    relative = entry.get("imagePath")
    if isinstance(relative, str) and relative:
        # LabelMe on Windows writes backslashes.
        candidate = source.parent / relative.replace("\\", "/")
        if candidate.is_file():
            return str(candidate)
    data = entry.get("imageData")
    if isinstance(data, str) and data:
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DatasetError(f"{source}: 'imageData' is not base64 image data") from exc
    missing_image(f"{source}: image {relative!r} not found and no 'imageData'", strict)
    return None


def _size(entry: Mapping[str, Any], image: ImageInput, source: Path) -> tuple[int, int]:
    width, height = entry.get("imageWidth"), entry.get("imageHeight")
    if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
        return width, height
    if isinstance(image, str):
        return header_size(Path(image), str(source))
    try:
        return displayed_size(image)
    except ImageError as exc:
        raise DatasetError(f"{source}: 'imageData' {exc}") from exc


def _add_shape(collector: AnnotationCollector, shape: Any, where: str) -> None:
    if not isinstance(shape, dict):
        raise DatasetError(f"{where}: a shape must be an object")
    label, kind, points = (
        shape.get("label"),
        shape.get("shape_type") or "polygon",
        shape.get("points"),
    )
    if not isinstance(label, str) or not label:
        raise DatasetError(f"{where}: 'label' must be a non-empty string")
    where = f"{where} ({label}, {kind})"
    if not isinstance(points, list):
        raise DatasetError(f"{where}: 'points' must be a list of [x, y]")
    if kind == "point":
        if len(points) != 1:
            raise DatasetError(f"{where}: expected 1 point, got {len(points)}")
        collector.add_point(points[0], label, where=where)
    elif kind == "circle":
        if len(points) != 2:
            raise DatasetError(f"{where}: expected the centre and a point on the circle")
        bounding_box(points, where)  # refuses points that are not number pairs
        (cx, cy), (x, y) = ((float(a), float(b)) for a, b in points)
        radius = math.hypot(x - cx, y - cy)
        collector.add_box((cx - radius, cy - radius, cx + radius, cy + radius), label, where=where)
    elif kind in _BOXED:
        if kind == "rectangle" and len(points) != 2:
            raise DatasetError(f"{where}: expected 2 corner points, got {len(points)}")
        collector.add_box(bounding_box(points, where), label, where=where)
    else:
        message = f"{where}: shape type {kind!r} is not read"
        if collector.strict:
            raise DatasetError(message)
        warn(message + "; skipped")


def read_labelme_file(path: Path, *, strict: bool = False) -> AnnotatedImage | None:
    """Read one LabelMe JSON file; ``None`` if its image is missing (and not ``strict``).

    Raises:
        DatasetError: Naming the file and shape, for a malformed file or shape.
    """
    entry = read_json(path)
    if not isinstance(entry, dict) or not isinstance(entry.get("shapes"), list):
        raise DatasetError(f"{path}: not a LabelMe file (expected an object with a 'shapes' list)")
    image = _image(entry, path, strict)
    if image is None:
        return None
    collector = AnnotationCollector(_size(entry, image, path), strict=strict)
    for index, shape in enumerate(entry["shapes"]):
        _add_shape(collector, shape, f"{path} shapes[{index}]")
    relative = entry.get("imagePath")
    name = Path(str(relative).replace("\\", "/")).name if relative else path.name
    return collector.build(image, name)


def read_labelme(
    path: str | Path, *, strict: bool = False
) -> tuple[list[AnnotatedImage], list[str]]:
    """Read a LabelMe JSON file, or every one under a folder (see the module docstring).

    Args:
        path: A LabelMe JSON file or a folder.
        strict: Refuse boxes outside the image or without area, missing images and
            shapes that are not read, instead of clamping or skipping them with a warning.

    Returns:
        The annotated images and the sorted class names used.

    Raises:
        DatasetError: Naming the file and shape, for a malformed file or shape.
    """
    files = labelme_files(Path(path))
    if not files:
        raise DatasetError(f"{path}: no LabelMe JSON file (an object with 'shapes')")
    images = [record for file in files if (record := read_labelme_file(file, strict=strict))]
    classes = sorted({name for record in images for name in (*record.labels, *record.point_labels)})
    return images, classes
