"""Annotated images, and the prompts a detection dataset yields: detect or point samples.

Every detection source (COCO, VOC, YOLO, torchvision datasets) is read into a list of
:class:`AnnotatedImage` (an image reference with normalized, validated boxes and their
class names) and a class list. :class:`DetectionPrompts` then expands them into one
sample per (image, class present), plus negative prompts for absent classes: for every
image, each absent class is drawn with probability ``negative_rate``, from a generator
seeded by ``seed`` and the image's position, so the set is the same on every run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset

from lightning_moondream.api.models import Box, Point
from lightning_moondream.data.classes import label_phrase, may_be_absent
from lightning_moondream.data.errors import DatasetError
from lightning_moondream.data.geometry import normalize_box, normalize_point
from lightning_moondream.data.samples import DetectSample, PointSample, QuerySample
from lightning_moondream.images import ImageInput


def as_image(value: Any, where: str) -> ImageInput:
    """Accept a dataset's image: PIL, a path, bytes, or a tensor (converted to PIL).

    Raises:
        DatasetError: Naming ``where``, for any other type.
    """
    if isinstance(value, torch.Tensor):
        from torchvision.transforms.v2.functional import to_pil_image

        return to_pil_image(value)
    if not isinstance(value, (Image.Image, str, bytes)):
        raise DatasetError(
            f"{where}: image of type {type(value).__name__} is not a PIL image, tensor, "
            "path or bytes"
        )
    return value


class DatasetItemImage:
    """The image of item ``index`` of a dataset that yields ``(image, target)`` pairs.

    Used where a dataset exposes no file path: the image is fetched (and decoded) only
    when a sample is built, in a DataLoader worker.
    """

    def __init__(self, dataset: Any, index: int) -> None:
        self.dataset = dataset
        self.index = index

    def __call__(self) -> ImageInput:
        """Fetch the image."""
        where = f"item {self.index} of {type(self.dataset).__name__}"
        return as_image(self.dataset[self.index][0], where)


ImageRef = ImageInput | DatasetItemImage


def resolve_image(image: ImageRef) -> ImageInput:
    """Return the image itself, fetching it if it is a :class:`DatasetItemImage`."""
    return image() if isinstance(image, DatasetItemImage) else image


@dataclass(frozen=True)
class AnnotatedImage:
    """One image, its boxes and its keypoints.

    Attributes:
        image: A path (usually), or a reference fetched when a sample is built.
        boxes: Normalized boxes, validated.
        labels: Class name of each box.
        id: Identifier naming the image, e.g. its file name.
        size: Displayed ``(width, height)`` used to normalize the boxes, if known.
        points: Normalized keypoints (labelled points, not boxes), validated.
        point_labels: Class name of each keypoint.
        occluded: Per box, whether the annotation tool marked it occluded; empty when
            the format has no such flag.
    """

    image: ImageRef
    boxes: tuple[Box, ...]
    labels: tuple[str, ...]
    id: str
    size: tuple[int, int] | None = None
    points: tuple[Point, ...] = ()
    point_labels: tuple[str, ...] = ()
    occluded: tuple[bool, ...] = ()

    def boxes_of(self, name: str) -> tuple[Box, ...]:
        """The boxes of class ``name``."""
        return tuple(
            box for box, label in zip(self.boxes, self.labels, strict=True) if label == name
        )

    def points_of(self, name: str) -> tuple[Point, ...]:
        """The keypoints of class ``name``."""
        return tuple(
            point
            for point, label in zip(self.points, self.point_labels, strict=True)
            if label == name
        )


def prompt_index(
    images: Sequence[AnnotatedImage],
    classes: Sequence[str],
    *,
    negative_rate: float,
    seed: int,
    groups: Collection[str] = (),
) -> list[tuple[int, str]]:
    """List ``(image position, class)`` pairs: each class present, plus drawn negatives.

    Args:
        images: The annotated images.
        classes: Every class, in a fixed order (prompts follow it within an image).
        negative_rate: Probability of a prompt for each absent class of an image.
        seed: Seed of the negative draws.
        groups: Names grouping other classes (supercategories), never negatives.

    Raises:
        ValueError: If ``negative_rate`` is not within 0 to 1.
    """
    if not 0.0 <= negative_rate <= 1.0:
        raise ValueError(f"negative_rate must be within 0 and 1, got {negative_rate}")
    index: list[tuple[int, str]] = []
    for position, image in enumerate(images):
        present = set(image.labels) | set(image.point_labels)
        rng = random.Random(f"{seed}:{position}") if negative_rate > 0 else None
        for name in classes:
            # The draw comes before the exclusion, so an excluded class leaves the other
            # classes' draws as they were.
            if name in present or (
                rng is not None
                and rng.random() < negative_rate
                and may_be_absent(name, present, groups)
            ):
                index.append((position, name))
    return index


def format_prompt(template: str, name: str, *, phrase: bool = False) -> str:
    """Fill ``{name}`` in a prompt template, e.g. ``"{name}"`` or ``"a {name}"``.

    Args:
        template: The template.
        name: The class name.
        phrase: Write the name as a phrase (``black-king`` as ``black king``).

    Raises:
        ValueError: If the template has another placeholder.
    """
    try:
        return template.format(name=label_phrase(name) if phrase else name)
    except (KeyError, IndexError) as exc:
        raise ValueError(f"prompt template {template!r} may only use {{name}}") from exc


class DetectionPrompts(Dataset):
    """Detect or point samples from annotated images: one per (image, class) prompt.

    A class an image has only as keypoints makes point prompts (its points the ground
    truth) and no detect prompt: it is neither boxed nor absent there.

    Args:
        images: The annotated images.
        classes: Every class name; prompts for absent classes are drawn from these.
        skill: ``"detect"`` (boxes) or ``"point"`` (ground truth: the boxes a point must
            fall in).
        template: Prompt template with ``{name}``, e.g. ``"{name}"``.
        negative_rate: Probability, per image and absent class, of a prompt whose
            ground truth is empty.
        seed: Seed of the negative draws.
        groups: Names grouping other classes (supercategories), never negatives.
        phrase_labels: Write class names as phrases in prompts (``black-king`` as
            ``black king``); sample ids keep the names.
    """

    def __init__(
        self,
        images: Sequence[AnnotatedImage],
        classes: Sequence[str],
        *,
        skill: Literal["detect", "point"] = "detect",
        template: str = "{name}",
        negative_rate: float = 0.0,
        seed: int = 0,
        groups: Collection[str] = (),
        phrase_labels: bool = False,
    ) -> None:
        if skill not in ("detect", "point"):
            raise ValueError(f"skill must be 'detect' or 'point' for boxes, got {skill!r}")
        format_prompt(template, "x")
        self.images = list(images)
        self.classes = list(classes)
        self.skill = skill
        self.template = template
        self.phrase_labels = phrase_labels
        index = prompt_index(
            self.images, self.classes, negative_rate=negative_rate, seed=seed, groups=groups
        )
        if skill == "detect":
            index = [
                (position, name)
                for position, name in index
                if name in self.images[position].labels
                or name not in self.images[position].point_labels
            ]
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> DetectSample | PointSample:
        position, name = self.index[index]
        record = self.images[position]
        points = record.points_of(name)
        if self.skill == "point" and points:
            return PointSample(
                image=resolve_image(record.image),
                object=format_prompt(self.template, name, phrase=self.phrase_labels),
                points=points,
                id=f"{record.id}#{name}",
                image_size=record.size,
            )
        make: Callable[..., DetectSample | PointSample] = (
            DetectSample if self.skill == "detect" else PointSample
        )
        return make(
            image=resolve_image(record.image),
            object=format_prompt(self.template, name, phrase=self.phrase_labels),
            boxes=record.boxes_of(name),
            id=f"{record.id}#{name}",
            image_size=record.size,
        )


class SampleList(Dataset):
    """A map-style dataset over samples built in advance (they hold paths, not pixels)."""

    def __init__(self, samples: Sequence[DetectSample | PointSample | QuerySample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> DetectSample | PointSample | QuerySample:
        return self.samples[index]


class AnnotationCollector:
    """Gathers one image's pixel boxes and keypoints, validated, into an :class:`AnnotatedImage`.

    Args:
        size: Displayed ``(width, height)`` the pixel coordinates refer to.
        strict: Refuse boxes and points outside the image or boxes without area,
            instead of clamping or dropping them with a warning.
    """

    def __init__(self, size: tuple[int, int], *, strict: bool = False) -> None:
        self.size = size
        self.strict = strict
        self.boxes: list[Box] = []
        self.labels: list[str] = []
        self.occluded: list[bool] = []
        self.points: list[Point] = []
        self.point_labels: list[str] = []

    def add_box(
        self, xyxy: Sequence[float], label: str, *, where: str, occluded: bool = False
    ) -> None:
        """Add a pixel box ``(x_min, y_min, x_max, y_max)`` of class ``label``."""
        box = normalize_box(xyxy, self.size, where=where, strict=self.strict)
        if box is not None:
            self.boxes.append(box)
            self.labels.append(label)
            self.occluded.append(occluded)

    def add_point(self, xy: Sequence[float], label: str, *, where: str) -> None:
        """Add a pixel keypoint ``(x, y)`` of class ``label``."""
        self.points.append(normalize_point(xy, self.size, where=where, strict=self.strict))
        self.point_labels.append(label)

    def build(self, image: ImageRef, image_id: str) -> AnnotatedImage:
        """The annotated image with everything added so far."""
        return AnnotatedImage(
            image=image,
            boxes=tuple(self.boxes),
            labels=tuple(self.labels),
            id=image_id,
            size=self.size,
            points=tuple(self.points),
            point_labels=tuple(self.point_labels),
            occluded=tuple(self.occluded),
        )
