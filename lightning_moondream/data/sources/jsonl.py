"""A JSONL manifest: one sample per line, for any skill.

Each line is a JSON object:

- ``image``: path of the image, relative to the manifest's folder (optional for
  ``query``; a ``data:`` URL is accepted too);
- ``skill``: ``"detect"``, ``"point"`` or ``"query"``;
- ``object`` (detect, point): the object phrase;
- ``boxes`` (detect; point with containment ground truth): a list of boxes, each
  ``[x_min, y_min, x_max, y_max]`` or ``{"x_min": ..., "y_min": ..., "x_max": ...,
  "y_max": ...}``; an empty list for an absent object;
- ``points`` (point): a list of points, each ``[x, y]`` or ``{"x": ..., "y": ...}``;
- ``question`` and ``answers`` (query): the question and a list of accepted answers
  (``"answer": "..."`` for a single one);
- ``coordinates`` (optional): ``"pixels"`` or ``"normalized"``; without it, coordinates
  are normalized when every value is within 0 to 1, else pixels (the loader's
  ``coordinates`` option can fix one choice for the whole file);
- ``width``, ``height`` (optional): the displayed image size, saving a header read for
  pixel coordinates;
- ``id`` (optional): an identifier; default ``manifest.jsonl:LINE``.

Example::

    {"image": "a.jpg", "skill": "detect", "object": "dog", "boxes": [[10, 20, 200, 180]]}
    {"image": "a.jpg", "skill": "point", "object": "dog's nose", "points": [[0.31, 0.4]]}
    {"image": "a.jpg", "skill": "query", "question": "How many dogs?", "answers": ["1", "one"]}

Blank lines and lines starting with ``#`` are ignored.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lightning_moondream.data.errors import DatasetError
from lightning_moondream.data.records import SampleList
from lightning_moondream.data.samples import DetectSample, PointSample, QuerySample
from lightning_moondream.images import is_data_url

Coordinates = Literal["auto", "pixels", "normalized"]
_BOX_KEYS = ("x_min", "y_min", "x_max", "y_max")


def _coords(items: Any, keys: Sequence[str], where: str, field: str) -> list[list[float]]:
    if not isinstance(items, list):
        raise DatasetError(f"{where}: {field!r} must be a list")
    result = []
    for position, item in enumerate(items):
        if isinstance(item, Mapping):
            if set(item) != set(keys):
                raise DatasetError(f"{where}: {field}[{position}] needs exactly {', '.join(keys)}")
            item = [item[key] for key in keys]
        if not isinstance(item, list) or len(item) != len(keys):
            raise DatasetError(f"{where}: {field}[{position}] must have {len(keys)} numbers")
        if not all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in item
        ):
            raise DatasetError(f"{where}: {field}[{position}] must have {len(keys)} numbers")
        result.append([float(value) for value in item])
    return result


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: {key!r} must be a non-empty string")
    return value


def _parse_line(
    entry: Any, where: str, default_id: str, base: Path, coordinates: Coordinates, strict: bool
) -> DetectSample | PointSample | QuerySample:
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: each line must be a JSON object")
    skill = entry.get("skill")
    sample_id = str(entry.get("id", default_id))
    raw_image = entry.get("image")
    image: str | None = None
    if raw_image is not None:
        if not isinstance(raw_image, str):
            raise DatasetError(f"{where}: 'image' must be a path string")
        image = raw_image if is_data_url(raw_image) else str(base / raw_image)
    if skill == "query":
        answers = entry.get("answers", [entry["answer"]] if "answer" in entry else None)
        if (
            not isinstance(answers, list)
            or not all(isinstance(a, str) for a in answers)
            or not answers
        ):
            raise DatasetError(f"{where}: 'answers' must be a non-empty list of strings")
        return QuerySample(image, _text(entry, "question", where), tuple(answers), id=sample_id)
    if skill not in ("detect", "point"):
        raise DatasetError(f"{where}: 'skill' must be detect, point or query, got {skill!r}")
    if image is None:
        raise DatasetError(f"{where}: {skill} needs an 'image'")
    phrase = _text(entry, "object", where)
    boxes = _coords(entry["boxes"], _BOX_KEYS, where, "boxes") if "boxes" in entry else None
    points = _coords(entry["points"], ("x", "y"), where, "points") if "points" in entry else None
    if skill == "detect" and (boxes is None or points is not None):
        raise DatasetError(f"{where}: detect needs 'boxes' (and no 'points')")
    if skill == "point" and (boxes is None) == (points is None):
        raise DatasetError(f"{where}: point needs exactly one of 'points' or 'boxes'")
    mode = entry.get("coordinates", coordinates)
    if mode not in ("auto", "pixels", "normalized"):
        raise DatasetError(f"{where}: 'coordinates' must be pixels or normalized, got {mode!r}")
    values = [value for item in (boxes or points or []) for value in item]
    if mode == "auto":
        mode = "normalized" if all(0.0 <= value <= 1.0 for value in values) else "pixels"
    size: tuple[int, int] | None = None
    if mode == "normalized":
        size = (1, 1)
    elif "width" in entry or "height" in entry:
        width, height = entry.get("width"), entry.get("height")
        if not isinstance(width, int) or not isinstance(height, int):
            raise DatasetError(f"{where}: 'width' and 'height' must both be integers")
        size = (width, height)
    if skill == "detect":
        sample: DetectSample | PointSample = DetectSample.from_pixels(
            image, phrase, boxes or [], size, id=sample_id, strict=strict, source=where
        )
    else:
        sample = PointSample.from_pixels(
            image, phrase, points, boxes, size, id=sample_id, strict=strict, source=where
        )
    # A unit size stood for "already normalized"; the real size is learned at encoding.
    return sample if mode == "pixels" else dataclasses.replace(sample, image_size=None)


def read_jsonl(
    path: str | Path,
    *,
    skill: str | None = None,
    coordinates: Coordinates = "auto",
    strict: bool = False,
) -> SampleList:
    """Read a JSONL manifest (format in the module docstring).

    Args:
        path: The manifest file.
        skill: Keep only lines of this skill; default: all.
        coordinates: How to read coordinates of lines without a ``coordinates`` key.
        strict: Refuse coordinates outside the image or boxes without area instead of
            clamping or dropping them with a warning.

    Raises:
        DatasetError: Naming the file and line of any malformed entry.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read manifest ({exc.strerror or exc})") from exc
    samples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} line {number}: malformed JSON ({exc.msg})") from exc
        if skill is not None and isinstance(entry, dict) and entry.get("skill") != skill:
            continue
        samples.append(
            _parse_line(
                entry,
                f"{path} line {number}",
                f"{path.name}:{number}",
                path.parent,
                coordinates,
                strict,
            )
        )
    return SampleList(samples)
