"""Label Studio JSON export (a list of tasks) to annotated images.

Each task has ``data.image`` (or another single string field) naming the image as Label
Studio stores it, and ``annotations``, each with a ``result`` list. The first annotation
not cancelled is read (a task without annotations: its first prediction, the
pre-annotations a model made); each result item is one region:

- ``type: rectanglelabels``: ``value.x``, ``value.y`` (top-left corner), ``value.width``,
  ``value.height`` in percent of ``original_width`` / ``original_height``, turned by
  ``value.rotation`` degrees clockwise about the top-left corner (the box around the
  turned rectangle is kept); classes in ``value.rectanglelabels``;
- ``type: polygonlabels``: ``value.points`` in percent; the box around them;
- ``type: keypointlabels``: ``value.x``, ``value.y`` in percent; a keypoint.

Other result types (choices, text, brushes) are skipped with a warning. Image paths are
resolved against ``image_root`` (default: the JSON's folder): ``/data/local-files/?d=
<path>`` by that path, then any path or URL by its file name anywhere under the folder,
with or without the 8-hex-digit prefix Label Studio adds to uploads
(``/data/upload/1/3f2a9c1e-cat.jpg`` is found as ``cat.jpg``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from lightning_moondream.data.errors import DatasetError, warn
from lightning_moondream.data.records import AnnotatedImage, AnnotationCollector
from lightning_moondream.data.sources.files import (
    header_size,
    image_files,
    missing_image,
    read_json,
    sniff_json,
)
from lightning_moondream.data.sources.shapes import bounding_box, rotated_box

_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
_KINDS = ("rectanglelabels", "polygonlabels", "keypointlabels")


def find_label_studio(path: Path) -> Path | None:
    """The export of ``path``: a JSON file holding a list, or the one such file in a folder.

    Raises:
        DatasetError: If a folder holds several such files.
    """
    if path.is_file():
        return path if path.suffix == ".json" and sniff_json(path) == "list" else None
    files = [file for file in sorted(path.glob("*.json")) if sniff_json(file) == "list"]
    if len(files) > 1:
        names = ", ".join(file.name for file in files)
        raise DatasetError(f"{path}: several Label Studio exports ({names}); pass the one to use")
    return files[0] if files else None


class ImageFinder:
    """Finds the files Label Studio image references point at, under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.by_name: dict[str, list[Path]] = {}
        for path in image_files(root):
            self.by_name.setdefault(path.name, []).append(path)

    def find(self, reference: str, where: str) -> Path | None:
        """The file of ``reference``, or ``None``.

        Raises:
            DatasetError: If its file name matches several files under the folder.
        """
        parsed = urlparse(reference)
        local = parse_qs(parsed.query).get("d")
        if local:
            candidate = self.root / unquote(local[0])
            if candidate.is_file():
                return candidate
        name = Path(unquote(local[0] if local else parsed.path)).name
        for key in (name, _UPLOAD_PREFIX.sub("", name)):
            matches = self.by_name.get(key, [])
            if len(matches) > 1:
                listed = ", ".join(str(match) for match in matches)
                raise DatasetError(f"{where}: image {reference!r} matches several files: {listed}")
            if matches:
                return matches[0]
        return None


def _image_reference(task: Mapping[str, Any], where: str) -> str:
    data = task.get("data")
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: no 'data' object")
    if isinstance(data.get("image"), str):
        return str(data["image"])
    strings = [value for value in data.values() if isinstance(value, str)]
    if len(strings) != 1:
        raise DatasetError(f"{where}: 'data' has no 'image' string naming the image")
    return strings[0]


def _chosen_results(task: Mapping[str, Any], where: str) -> list[Any]:
    # A task nobody has annotated yet keeps its pre-annotations as predictions.
    for key in ("annotations", "predictions"):
        entries = task.get(key, [])
        if not isinstance(entries, list):
            raise DatasetError(f"{where}: {key!r} must be a list")
        for entry in entries:
            if isinstance(entry, dict) and not entry.get("was_cancelled"):
                results = entry.get("result", [])
                if not isinstance(results, list):
                    raise DatasetError(f"{where}: 'result' must be a list")
                return results
    return []


def _size(results: list[Any], image: Path, where: str) -> tuple[int, int]:
    for result in results:
        if isinstance(result, dict):
            width, height = result.get("original_width"), result.get("original_height")
            if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
                return width, height
    return header_size(image, where)


def _percent(value: Mapping[str, Any], key: str, where: str) -> float:
    number = value.get(key)
    if not isinstance(number, (int, float)) or isinstance(number, bool):
        raise DatasetError(f"{where}: value.{key} must be a number (percent), got {number!r}")
    return float(number)


def _add_region(
    collector: AnnotationCollector, result: Mapping[str, Any], kind: str, where: str
) -> None:
    value = result.get("value")
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: no 'value' object")
    labels = value.get(kind)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise DatasetError(f"{where}: value.{kind} must be a non-empty list of label names")
    width, height = collector.size
    for label in labels:
        at = f"{where} ({label})"
        if kind == "keypointlabels":
            xy = (_percent(value, "x", at) * width / 100, _percent(value, "y", at) * height / 100)
            collector.add_point(xy, label, where=at)
        elif kind == "polygonlabels":
            points = value.get("points")
            if not isinstance(points, list):
                raise DatasetError(f"{at}: value.points must be a list of [x, y] percents")
            pixels = [
                (x * width / 100, y * height / 100)
                for x, y in (
                    point for point in points if isinstance(point, list) and len(point) == 2
                )
            ]
            if len(pixels) != len(points):
                raise DatasetError(f"{at}: value.points must be a list of [x, y] percents")
            collector.add_box(bounding_box(pixels, at), label, where=at)
        else:
            x, y = _percent(value, "x", at) * width / 100, _percent(value, "y", at) * height / 100
            w = _percent(value, "width", at) * width / 100
            h = _percent(value, "height", at) * height / 100
            degrees = float(value.get("rotation") or 0.0)
            collector.add_box(rotated_box(x, y, w, h, degrees, (x, y)), label, where=at)


def read_label_studio(
    export_file: str | Path,
    image_root: str | Path | None = None,
    *,
    strict: bool = False,
) -> tuple[list[AnnotatedImage], list[str]]:
    """Read a Label Studio JSON export (see the module docstring).

    Args:
        export_file: The exported JSON file.
        image_root: The folder holding the images; default: the JSON's folder.
        strict: Refuse boxes outside the image or without area, missing images and
            results that are not read, instead of clamping or skipping them with a
            warning.

    Returns:
        The annotated images and the sorted class names used.

    Raises:
        DatasetError: Naming the file, task and result, for a malformed task or region.
    """
    path = Path(export_file)
    tasks = read_json(path)
    if not isinstance(tasks, list):
        raise DatasetError(f"{path}: a Label Studio export must hold a list of tasks")
    finder = ImageFinder(Path(image_root) if image_root is not None else path.parent)
    images: list[AnnotatedImage] = []
    classes: set[str] = set()
    for position, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise DatasetError(f"{path} task [{position}]: must be an object")
        where_task = f"{path} task {task.get('id', f'[{position}]')}"
        reference = _image_reference(task, where_task)
        image = finder.find(reference, where_task)
        if image is None:
            missing_image(
                f"{where_task}: image {reference!r} not found under {finder.root}", strict
            )
            continue
        results = _chosen_results(task, where_task)
        collector = AnnotationCollector(_size(results, image, where_task), strict=strict)
        for index, result in enumerate(results):
            where = f"{where_task} result {index}"
            if isinstance(result, dict) and result.get("id"):
                where += f" (id {result['id']})"
            kind = result.get("type") if isinstance(result, dict) else None
            if kind not in _KINDS:
                message = f"{where}: type {kind!r} is not rectanglelabels, polygonlabels or keypointlabels"
                if strict:
                    raise DatasetError(message)
                warn(message + "; skipped")
                continue
            _add_region(collector, result, str(kind), where)
        record = collector.build(str(image), image.name)
        classes.update(record.labels, record.point_labels)
        images.append(record)
    return images, sorted(classes)
