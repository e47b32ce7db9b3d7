"""Samples: one prompt about one image, with its ground truth, ready to become a request.

A sample is what a dataset of this package returns and what a batch is a list of. Its
coordinates are normalized once, when it is built (see :meth:`DetectSample.from_pixels`);
its image starts as whatever names it (usually a path) and becomes a JPEG data URL when
:meth:`encoded` runs, in a DataLoader worker. Samples are frozen and picklable.
"""

from __future__ import annotations

import dataclasses
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from typing_extensions import Self

from lightning_moondream.api.models import (
    AnyRequest,
    Box,
    DetectGroundTruth,
    DetectRequest,
    GroundTruth,
    Point,
    PointGroundTruth,
    PointRequest,
    QueryRequest,
    Settings,
)
from lightning_moondream.data.encoding import EncodedImageCache
from lightning_moondream.data.errors import DatasetError, DatasetWarning
from lightning_moondream.data.geometry import normalize_box, normalize_point
from lightning_moondream.images import (
    EncodingOptions,
    ImageError,
    ImageInput,
    describe_source,
    displayed_size,
    encode_image_with_size,
    is_data_url,
)

_ASPECT_TOLERANCE = 0.01


def _image_bytes(image: ImageInput | None) -> int:
    return len(image) if isinstance(image, str) and is_data_url(image) else 0


def _size_of(image: ImageInput, image_size: tuple[int, int] | None, source: str) -> tuple[int, int]:
    if image_size is not None:
        return image_size
    try:
        return displayed_size(image)
    except ImageError as exc:
        raise DatasetError(f"{source}: {exc}") from exc


def _without_max_objects(settings: Settings | None) -> Settings | None:
    """Settings for a skill other than detect: one set can serve batches of mixed skills."""
    if settings is None or settings.max_objects is None:
        return settings
    return settings.model_copy(update={"max_objects": None})


def _box_dicts(boxes: Sequence[Box]) -> list[dict[str, float]]:
    return [box.model_dump() for box in boxes]


def _refs(refs: Sequence[Sequence[float]] | None) -> list[list[float]] | None:
    return None if refs is None else [list(ref) for ref in refs]


def _normalized_boxes(
    pixel_boxes: Sequence[Sequence[float]], size: tuple[int, int], where: str, strict: bool
) -> tuple[Box, ...]:
    """Pixel boxes normalized to the image; those dropped with a warning left out."""
    boxes = [
        normalize_box(box, size, where=f"{where} box {index}", strict=strict)
        for index, box in enumerate(pixel_boxes)
    ]
    return tuple(box for box in boxes if box is not None)


class _ImageCarrier(ABC):
    """What every sample does with its image: count it and encode it once."""

    image: ImageInput | None
    image_size: tuple[int, int] | None
    id: str
    spatial_refs: tuple[tuple[float, ...], ...] | None

    @abstractmethod
    def to_request(self, settings: Settings | None = None) -> AnyRequest:
        """Build the request of this sample's skill."""

    @abstractmethod
    def target(self) -> dict[str, Any]:
        """The sample's ground truth as plain JSON."""

    def sft_target(self) -> dict[str, Any]:
        """The target of an SFT group: the sample's points or boxes."""
        return self.target()

    def sft_group(self, settings: Settings | None = None) -> dict[str, Any]:
        """Build a supervised ``/train_step`` group ``{mode: "sft", request, target}``.

        SFT groups travel only on the ``/finetunes`` dialect.
        """
        return {
            "mode": "sft",
            "request": self.to_request(settings).to_json(),
            "target": self.sft_target(),
        }

    @property
    def image_bytes(self) -> int:
        """Size of the image data URL once encoded, else 0."""
        return _image_bytes(self.image)

    def encoded(
        self, options: EncodingOptions | None = None, cache: EncodedImageCache | None = None
    ) -> Self:
        """Return a copy whose image (if any) is a data URL and ``image_size`` is set.

        Raises:
            DatasetError: If the image cannot be read; the message names the file.
        """
        options = options or EncodingOptions()
        image = self.image
        if image is None or (is_data_url(image) and self.image_size is not None):
            return self
        try:
            url, size = (cache.encode if cache is not None else encode_image_with_size)(
                image, options
            )
        except ImageError as exc:
            label = f" (sample {self.id!r})" if self.id else ""
            raise DatasetError(f"{exc}{label}") from exc
        if self.image_size is not None and self.image_size != size:
            expected = self.image_size[0] / self.image_size[1]
            if abs(size[0] / size[1] - expected) > _ASPECT_TOLERANCE * expected:
                # Coordinates were normalized by another frame, typically an annotation
                # tool that ignored EXIF orientation: they will not match the image sent.
                warnings.warn(
                    f"{describe_source(image)}: annotated as {self.image_size[0]}x"
                    f"{self.image_size[1]} but displayed as {size[0]}x{size[1]}",
                    DatasetWarning,
                    stacklevel=2,
                )
        return dataclasses.replace(cast(Any, self), image=url, image_size=size)


class _ObjectSample(_ImageCarrier):
    """A sample about every instance of an object phrase (detect, point)."""

    image: ImageInput
    object: str
    spatial_refs: tuple[tuple[float, ...], ...] | None

    @property
    def label(self) -> str:
        """The object phrase."""
        return self.object

    def _object_request(
        self, request: type[DetectRequest] | type[PointRequest], settings: Settings | None
    ) -> AnyRequest:
        return request.model_validate(
            {
                "object": self.object,
                "image_url": self.image,
                "settings": settings,
                "spatial_refs": _refs(self.spatial_refs),
            }
        )


@dataclass(frozen=True)
class DetectSample(_ObjectSample):
    """Detect every instance of ``object`` in ``image``.

    Attributes:
        image: The image: a path, bytes, PIL image, or (once encoded) a data URL.
        object: The object phrase sent as the request's ``object``.
        boxes: True boxes, normalized; empty when the object is absent.
        id: An identifier naming the source, for messages and logs.
        image_size: Displayed ``(width, height)`` of the image, when known.
        spatial_refs: Points or boxes (0-1) the request refers to (``/finetunes``).
    """

    skill: ClassVar[str] = "detect"
    image: ImageInput
    object: str
    boxes: tuple[Box, ...]
    id: str = ""
    image_size: tuple[int, int] | None = None
    spatial_refs: tuple[tuple[float, ...], ...] | None = None

    @classmethod
    def from_pixels(
        cls,
        image: ImageInput,
        object: str,
        pixel_boxes: Sequence[Sequence[float]],
        image_size: tuple[int, int] | None = None,
        *,
        id: str = "",
        strict: bool = False,
        source: str | None = None,
    ) -> DetectSample:
        """Build a sample from pixel boxes ``(x_min, y_min, x_max, y_max)``.

        Boxes are normalized once, by the displayed (EXIF-oriented) size: ``image_size``
        when given, else read from the image header.

        Args:
            image: The image.
            object: The object phrase.
            pixel_boxes: Boxes in pixels of the displayed image.
            image_size: Displayed ``(width, height)``; read from the image if ``None``.
            id: Sample identifier.
            strict: Refuse boxes outside the image or without area instead of
                clamping or dropping them with a warning.
            source: The annotation file, for messages; defaults to the image.

        Raises:
            DatasetError: Naming the file and box, for an invalid box (see
                :func:`~lightning_moondream.data.geometry.normalize_box`) or an
                unreadable image.
        """
        source = source or describe_source(image)
        size = _size_of(image, image_size, source)
        boxes = _normalized_boxes(pixel_boxes, size, f"{source} {object!r}", strict)
        return cls(image=image, object=object, boxes=boxes, id=id, image_size=size)

    def to_request(self, settings: Settings | None = None) -> AnyRequest:
        """Build the detect request; encodes the image if it is not encoded yet."""
        return self._object_request(DetectRequest, settings)

    def ground_truth(self) -> GroundTruth | None:
        """The true boxes, as the API's ground truth."""
        return DetectGroundTruth(boxes=list(self.boxes))

    def target(self) -> dict[str, Any]:
        """``{"boxes": [...]}`` in normalized coordinates, for metrics."""
        return {"boxes": _box_dicts(self.boxes)}


@dataclass(frozen=True)
class PointSample(_ObjectSample):
    """Point at every instance of ``object`` in ``image``.

    Ground truth is either true ``points`` or ``boxes`` a point must fall in, not both.

    Attributes:
        image: The image: a path, bytes, PIL image, or (once encoded) a data URL.
        object: The object phrase sent as the request's ``object``.
        points: True points, normalized.
        boxes: Boxes that contain a correct point, normalized.
        id: An identifier naming the source.
        image_size: Displayed ``(width, height)`` of the image, when known.
        spatial_refs: Points or boxes (0-1) the request refers to (``/finetunes``).
    """

    skill: ClassVar[str] = "point"
    image: ImageInput
    object: str
    points: tuple[Point, ...] | None = None
    boxes: tuple[Box, ...] | None = None
    id: str = ""
    image_size: tuple[int, int] | None = None
    spatial_refs: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        if (self.points is None) == (self.boxes is None):
            raise ValueError("a point sample needs exactly one of 'points' or 'boxes'")

    @classmethod
    def from_pixels(
        cls,
        image: ImageInput,
        object: str,
        pixel_points: Sequence[Sequence[float]] | None = None,
        pixel_boxes: Sequence[Sequence[float]] | None = None,
        image_size: tuple[int, int] | None = None,
        *,
        id: str = "",
        strict: bool = False,
        source: str | None = None,
    ) -> PointSample:
        """Build a sample from pixel points ``(x, y)`` or pixel boxes.

        Args:
            image: The image.
            object: The object phrase.
            pixel_points: True points in pixels of the displayed image.
            pixel_boxes: Containing boxes in pixels, instead of points.
            image_size: Displayed ``(width, height)``; read from the image if ``None``.
            id: Sample identifier.
            strict: Refuse coordinates outside the image instead of clamping them.
            source: The annotation file, for messages; defaults to the image.

        Raises:
            DatasetError: Naming the file and annotation, for invalid coordinates.
            ValueError: Unless exactly one of ``pixel_points`` and ``pixel_boxes`` is given.
        """
        if (pixel_points is None) == (pixel_boxes is None):
            raise ValueError("give exactly one of pixel_points or pixel_boxes")
        source = source or describe_source(image)
        size = _size_of(image, image_size, source)
        if pixel_points is not None:
            points = tuple(
                normalize_point(xy, size, where=f"{source} {object!r} point {i}", strict=strict)
                for i, xy in enumerate(pixel_points)
            )
            return cls(image=image, object=object, points=points, id=id, image_size=size)
        boxes = _normalized_boxes(pixel_boxes or (), size, f"{source} {object!r}", strict)
        return cls(image=image, object=object, boxes=boxes, id=id, image_size=size)

    def to_request(self, settings: Settings | None = None) -> AnyRequest:
        """Build the point request; encodes the image if it is not encoded yet."""
        return self._object_request(PointRequest, _without_max_objects(settings))

    def ground_truth(self) -> GroundTruth | None:
        """The true points, or the containing boxes, as the API's ground truth."""
        if self.points is not None:
            return PointGroundTruth(points=list(self.points))
        return PointGroundTruth(boxes=list(self.boxes or ()))

    def target(self) -> dict[str, Any]:
        """``{"points": [...]}`` or ``{"boxes": [...]}``, normalized, for metrics."""
        if self.points is not None:
            return {"points": [point.model_dump() for point in self.points]}
        return {"boxes": _box_dicts(self.boxes or ())}


@dataclass(frozen=True)
class QuerySample(_ImageCarrier):
    """Ask ``question``, optionally about ``image``; any of ``answers`` is correct.

    Attributes:
        image: The image, or ``None`` for a text-only question.
        question: The question.
        answers: Accepted answers (for reward functions and metrics; the API takes no
            ground truth for query).
        id: An identifier naming the source.
        image_size: Displayed ``(width, height)`` of the image, when known.
        spatial_refs: Points ``(x, y)`` or boxes ``(x1, y1, x2, y2)`` (0-1) the question
            refers to (``/finetunes`` dialect).
        reasoning: Ask for reasoning with the answer (``/finetunes`` dialect).
        reasoning_text: Reasoning to teach with the first answer in SFT groups.
    """

    skill: ClassVar[str] = "query"
    image: ImageInput | None
    question: str
    answers: tuple[str, ...]
    id: str = ""
    image_size: tuple[int, int] | None = None
    spatial_refs: tuple[tuple[float, ...], ...] | None = None
    reasoning: bool = False
    reasoning_text: str | None = None

    @property
    def label(self) -> str:
        """The question."""
        return self.question

    def to_request(self, settings: Settings | None = None) -> AnyRequest:
        """Build the query request; encodes the image if it is not encoded yet."""
        return QueryRequest.model_validate(
            {
                "question": self.question,
                "image_url": self.image,
                "settings": _without_max_objects(settings),
                "spatial_refs": _refs(self.spatial_refs),
                "reasoning": self.reasoning or None,
            }
        )

    def ground_truth(self) -> GroundTruth | None:
        """Always ``None``: the API takes no ground truth for query."""
        return None

    def target(self) -> dict[str, Any]:
        """``{"answers": [...]}``, for reward functions and metrics."""
        return {"answers": list(self.answers)}

    def sft_target(self) -> dict[str, Any]:
        """``{answer, reasoning?}``: the first accepted answer, with ``reasoning_text``.

        Raises:
            ValueError: If the sample has no accepted answer to teach.
        """
        if not self.answers:
            raise ValueError(f"query sample {self.id!r} has no answer to build an SFT target")
        target: dict[str, Any] = {"answer": self.answers[0]}
        if self.reasoning_text is not None:
            target["reasoning"] = self.reasoning_text
        return target


Sample = DetectSample | PointSample | QuerySample
"""A sample of any skill."""
