"""Seeded synthetic scenes of coloured shapes, with detect, point and query tasks.

Every scene is a function of its seed alone, so a dataset is just a range of seeds and
needs no files. ``split_seed`` maps ``(split, index)`` to disjoint seed ranges, so the
train, validation and test scenes never overlap.

Phrases name objects in three ways, all lower case:

- by shape: ``"circle"`` (every circle in the scene);
- by colour: ``"red shape"`` (every red object, whatever its shape);
- by both: ``"red circle"``.

``detect_tasks`` and ``point_tasks`` give every phrase that matches something in the
scene, plus one phrase of a colour and shape that is absent (its answer is empty), so a
model also learns to answer "nothing". ``query_tasks`` asks for counts ("How many circles
are there?"), colours ("What color is the square?", when there is one square) and shapes
("What shape is the red object?", when there is one red object).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")

_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SPLITS = {"train": 0, "val": 1, "test": 2}
_SPLIT_SIZE = 1_000_000_000
_MIN_SIDE, _MAX_SIDE = 0.18, 0.34
_MAX_OVERLAP = 0.1
"""Largest IoU allowed between two objects of a scene, so every object stays visible."""

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene.

    Attributes:
        shape: One of ``SHAPES``.
        color: One of ``COLORS``.
        box: Normalized ``(x_min, y_min, x_max, y_max)``.
    """

    shape: str
    color: str
    box: Box

    @property
    def center(self) -> tuple[float, float]:
        """Normalized ``(x, y)`` centre of the box."""
        x_min, y_min, x_max, y_max = self.box
        return ((x_min + x_max) / 2, (y_min + y_max) / 2)

    @property
    def name(self) -> str:
        """The object's full name, e.g. ``"red circle"``."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A rendered scene and the objects drawn in it.

    Attributes:
        seed: The seed the scene was made from.
        image: The RGB image.
        objects: The objects, in drawing order.
    """

    seed: int
    image: Image.Image
    objects: tuple[ShapeObject, ...]


def split_seed(split: str, index: int) -> int:
    """Seed of scene ``index`` of a split; the splits' seed ranges are disjoint.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        index: Scene index within the split, from 0 to 999,999,999.

    Raises:
        ValueError: For an unknown split or an index out of range.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
    if not 0 <= index < _SPLIT_SIZE:
        raise ValueError(f"index must be from 0 to {_SPLIT_SIZE - 1}, got {index}")
    return _SPLITS[split] * _SPLIT_SIZE + index


def _iou(first: Box, second: Box) -> float:
    width = min(first[2], second[2]) - max(first[0], second[0])
    height = min(first[3], second[3]) - max(first[1], second[1])
    if width <= 0 or height <= 0:
        return 0.0
    intersection = width * height
    area = (first[2] - first[0]) * (first[3] - first[1]) + (second[2] - second[0]) * (
        second[3] - second[1]
    )
    return intersection / (area - intersection)


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, size: int) -> None:
    # Pixel box edges are inclusive in PIL, hence the -1 on the far edges.
    x_min, y_min, x_max, y_max = (
        round(obj.box[0] * size),
        round(obj.box[1] * size),
        round(obj.box[2] * size) - 1,
        round(obj.box[3] * size) - 1,
    )
    fill = _RGB[obj.color]
    if obj.shape == "circle":
        draw.ellipse((x_min, y_min, x_max, y_max), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x_min, y_min, x_max, y_max), fill=fill)
    else:
        draw.polygon([((x_min + x_max) / 2, y_min), (x_max, y_max), (x_min, y_max)], fill=fill)


def make_scene(seed: int, *, size: int = 128, max_objects: int = 4) -> Scene:
    """Render the scene of a seed: 1 to ``max_objects`` shapes on a plain background.

    Boxes are snapped to whole pixels, so the drawn shape fills its box exactly.

    Args:
        seed: Any integer; the same seed always gives the same scene.
        size: Side of the square image in pixels.
        max_objects: Largest number of objects.

    Raises:
        ValueError: If ``size`` is below 16 or ``max_objects`` below 1.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be at least 1, got {max_objects}")
    rng = random.Random(seed)
    count = rng.randint(1, max_objects)
    objects: list[ShapeObject] = []
    # Rejection sampling bounded in attempts: a crowded scene simply gets fewer objects.
    for _ in range(count * 20):
        if len(objects) == count:
            break
        side = rng.uniform(_MIN_SIDE, _MAX_SIDE)
        x_min, y_min = rng.uniform(0.0, 1.0 - side), rng.uniform(0.0, 1.0 - side)
        pixels = [round(value * size) for value in (x_min, y_min, x_min + side, y_min + side)]
        box: Box = (
            pixels[0] / size,
            pixels[1] / size,
            pixels[2] / size,
            pixels[3] / size,
        )
        if any(_iou(box, other.box) > _MAX_OVERLAP for other in objects):
            continue
        objects.append(ShapeObject(rng.choice(SHAPES), rng.choice(COLORS), box))
    shade = rng.randint(225, 255)
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj, size)
    return Scene(seed=seed, image=image, objects=tuple(objects))


def _phrases(scene: Scene) -> list[tuple[str, list[ShapeObject]]]:
    phrases: dict[str, list[ShapeObject]] = {}
    for obj in scene.objects:
        for phrase in (obj.shape, f"{obj.color} shape", obj.name):
            phrases.setdefault(phrase, []).append(obj)
    present = {obj.name for obj in scene.objects}
    absent = [
        f"{color} {shape}"
        for color in COLORS
        for shape in SHAPES
        if f"{color} {shape}" not in present
    ]
    result = sorted(phrases.items())
    if absent:
        result.append((random.Random(scene.seed).choice(absent), []))
    return result


def _in_reading_order(objects: list[ShapeObject]) -> list[ShapeObject]:
    return sorted(objects, key=lambda obj: (obj.box[0], obj.box[1]))


def detect_tasks(scene: Scene) -> list[tuple[str, list[Box]]]:
    """Detect tasks of a scene: ``(phrase, boxes)``, boxes left to right.

    Includes one absent phrase with no boxes.
    """
    return [
        (phrase, [obj.box for obj in _in_reading_order(objs)]) for phrase, objs in _phrases(scene)
    ]


def point_tasks(scene: Scene) -> list[tuple[str, list[tuple[float, float]]]]:
    """Point tasks of a scene: ``(phrase, centres)``, centres left to right.

    Includes one absent phrase with no points.
    """
    return [
        (phrase, [obj.center for obj in _in_reading_order(objs)])
        for phrase, objs in _phrases(scene)
    ]


def _count_answers(count: int) -> list[str]:
    return [str(count), _NUMBER_WORDS[count]] if count < len(_NUMBER_WORDS) else [str(count)]


def query_tasks(scene: Scene) -> list[tuple[str, list[str]]]:
    """Question tasks of a scene: ``(question, accepted answers)``.

    Counts for every shape (including absent ones, answer "0"), the colour of a shape
    that appears once, and the shape of a colour that appears once.
    """
    tasks: list[tuple[str, list[str]]] = []
    for shape in SHAPES:
        matching = [obj for obj in scene.objects if obj.shape == shape]
        tasks.append((f"How many {shape}s are there?", _count_answers(len(matching))))
        if len(matching) == 1:
            tasks.append((f"What color is the {shape}?", [matching[0].color]))
    for color in COLORS:
        matching = [obj for obj in scene.objects if obj.color == color]
        if len(matching) == 1:
            tasks.append((f"What shape is the {color} object?", [matching[0].shape]))
    return tasks
