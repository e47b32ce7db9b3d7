"""Pixel coordinates to the API's normalized boxes and points, validated once at load time.

Pixel coordinates are continuous, measured on the image as displayed (after EXIF
orientation): a box ``(0, 0, width, height)`` covers the whole image. A coordinate
outside the image is clamped with a :class:`DatasetWarning` (or refused when
``strict``); a box without area is dropped with a warning (or refused when ``strict``);
a coordinate that is not a finite number is always refused. Every message names the
file and the annotation, passed in as ``where``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning_moondream.api.models import Box, Point
from lightning_moondream.data.errors import DatasetError, warn

_TOLERANCE = 1e-6
"""Overshoot (relative to the image side) clamped silently: float rounding, not an error."""


def _overshoots(values: Sequence[float], clamped: Sequence[float], size: tuple[int, int]) -> bool:
    limit = _TOLERANCE * max(size)
    return any(abs(value - kept) > limit for value, kept in zip(values, clamped, strict=True))


def _finite(values: Sequence[float], where: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(value) for value in values)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{where}: coordinates {list(values)!r} are not numbers") from exc
    if not all(math.isfinite(value) for value in numbers):
        raise DatasetError(f"{where}: coordinates {list(values)!r} are not finite")
    return numbers


def _check_size(size: tuple[int, int], where: str) -> tuple[int, int]:
    width, height = size
    if width <= 0 or height <= 0:
        raise DatasetError(f"{where}: image size {width}x{height} has no area")
    return width, height


def normalize_box(
    xyxy: Sequence[float],
    size: tuple[int, int],
    *,
    where: str,
    strict: bool = False,
) -> Box | None:
    """Turn a pixel box into a normalized :class:`Box`.

    Args:
        xyxy: ``(x_min, y_min, x_max, y_max)`` in pixels of the displayed image.
        size: Displayed ``(width, height)`` of the image.
        where: The file and annotation, for messages, e.g. ``"a.xml object 2"``.
        strict: Refuse boxes that would otherwise be clamped or dropped.

    Returns:
        The box, or ``None`` when it has no area (inside the image) and was dropped.

    Raises:
        DatasetError: For non-finite coordinates, or in strict mode for a box outside
            the image or without area.
    """
    if len(xyxy) != 4:
        raise DatasetError(f"{where}: a box needs 4 coordinates, got {len(xyxy)}")
    x_min, y_min, x_max, y_max = _finite(xyxy, where)
    width, height = _check_size(size, where)
    if x_max <= x_min or y_max <= y_min:
        message = f"{where}: box {[x_min, y_min, x_max, y_max]} has zero area"
        if strict:
            raise DatasetError(message)
        warn(message + "; dropped")
        return None
    clamped = (
        min(max(x_min, 0.0), width),
        min(max(y_min, 0.0), height),
        min(max(x_max, 0.0), width),
        min(max(y_max, 0.0), height),
    )
    if _overshoots((x_min, y_min, x_max, y_max), clamped, size):
        message = f"{where}: box {[x_min, y_min, x_max, y_max]} extends outside the {width}x{height} image"
        if strict:
            raise DatasetError(message)
        if clamped[2] <= clamped[0] or clamped[3] <= clamped[1]:
            warn(message + " and lies entirely outside it; dropped")
            return None
        warn(message + f"; clamped to {list(clamped)}")
    return Box(
        x_min=clamped[0] / width,
        y_min=clamped[1] / height,
        x_max=clamped[2] / width,
        y_max=clamped[3] / height,
    )


def normalize_point(
    xy: Sequence[float],
    size: tuple[int, int],
    *,
    where: str,
    strict: bool = False,
) -> Point:
    """Turn a pixel point into a normalized :class:`Point`, clamping it into the image.

    Args:
        xy: ``(x, y)`` in pixels of the displayed image.
        size: Displayed ``(width, height)`` of the image.
        where: The file and annotation, for messages.
        strict: Refuse a point outside the image instead of clamping it.

    Raises:
        DatasetError: For non-finite coordinates, or in strict mode a point outside.
    """
    if len(xy) != 2:
        raise DatasetError(f"{where}: a point needs 2 coordinates, got {len(xy)}")
    x, y = _finite(xy, where)
    width, height = _check_size(size, where)
    clamped = (min(max(x, 0.0), width), min(max(y, 0.0), height))
    if _overshoots((x, y), clamped, size):
        message = f"{where}: point {[x, y]} lies outside the {width}x{height} image"
        if strict:
            raise DatasetError(message)
        warn(message + f"; clamped to {list(clamped)}")
    return Point(x=clamped[0] / width, y=clamped[1] / height)


def check_normalized_box(xyxy: Sequence[float], *, where: str, strict: bool = False) -> Box | None:
    """Validate a box already in normalized coordinates (as YOLO or a manifest gives it).

    Clamping and dropping follow :func:`normalize_box` on a unit image.
    """
    return normalize_box(xyxy, (1, 1), where=where, strict=strict)
