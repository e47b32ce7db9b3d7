"""Boxes around the shapes annotation tools draw: polygons, rotated rectangles, ellipses."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning_moondream.data.errors import DatasetError


def bounding_box(points: Sequence[Sequence[float]], where: str) -> tuple[float, ...]:
    """The pixel box ``(x_min, y_min, x_max, y_max)`` around two or more ``(x, y)`` points.

    Raises:
        DatasetError: Naming ``where``, if there are fewer than two points or a point is
            not a pair of numbers.
    """
    try:
        pairs = [(float(x), float(y)) for x, y in points]
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{where}: expected a list of [x, y] points, got {points!r}") from exc
    if len(pairs) < 2:
        raise DatasetError(f"{where}: expected at least 2 points for a box, got {len(pairs)}")
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    return min(xs), min(ys), max(xs), max(ys)


def rotated_box(
    x: float, y: float, width: float, height: float, degrees: float, pivot: tuple[float, float]
) -> tuple[float, ...]:
    """The axis-aligned box around a rectangle turned clockwise by ``degrees`` about ``pivot``.

    Args:
        x: Left edge of the unrotated rectangle, in pixels.
        y: Top edge of the unrotated rectangle, in pixels.
        width: Width of the rectangle, in pixels.
        height: Height of the rectangle, in pixels.
        degrees: Clockwise rotation on screen (y pointing down).
        pivot: The point the rectangle turns about, in pixels.
    """
    if degrees % 360 == 0:
        return x, y, x + width, y + height
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    px, py = pivot
    corners = [(x, y), (x + width, y), (x + width, y + height), (x, y + height)]
    turned = [
        (px + (cx - px) * cos - (cy - py) * sin, py + (cx - px) * sin + (cy - py) * cos)
        for cx, cy in corners
    ]
    return bounding_box(turned, "rotated box")


def parse_point_list(text: str, where: str) -> list[tuple[float, float]]:
    """Read CVAT's ``"x1,y1;x2,y2;..."`` points.

    Raises:
        DatasetError: Naming ``where`` and the text, if it is not such a list.
    """
    try:
        return [
            (float(x), float(y))
            for x, y in (pair.split(",") for pair in text.strip().split(";") if pair.strip())
        ]
    except ValueError as exc:
        raise DatasetError(f"{where}: points {text!r} are not 'x,y;x,y;...' numbers") from exc
