"""Point samples from keypoints: COCO person keypoints and CelebA facial landmarks.

COCO: one prompt per (image, keypoint name) with at least one visible keypoint
(``v > 0``; ``v = 0`` means not labelled), its ground truth every visible instance of
that keypoint in the image, e.g. the left eyes of all people. Names become phrases with
spaces (``left_eye`` becomes ``"left eye"``) through a template with ``{name}`` and
``{category}``.

CelebA: torchvision's ``CelebA(target_type="landmarks")`` gives five landmarks per
image; each becomes one prompt with one true point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lightning_moondream.api.models import Point
from lightning_moondream.data.classes import label_phrase
from lightning_moondream.data.errors import DatasetError
from lightning_moondream.data.geometry import normalize_point
from lightning_moondream.data.records import SampleList, as_image
from lightning_moondream.data.samples import PointSample
from lightning_moondream.data.sources.coco import (
    coco_categories,
    coco_image_table,
    default_image_root,
    read_coco_file,
)
from lightning_moondream.images import ImageError, displayed_size


def _visible_points(
    annotation: Mapping[str, Any],
    categories: Mapping[int, dict[str, Any]],
    template: str,
    size: tuple[int, int],
    where: str,
    strict: bool,
) -> list[tuple[str, Point]]:
    """An annotation's visible keypoints, each with its prompt phrase."""
    category_id: Any = annotation.get("category_id")
    category = categories.get(category_id)
    if category is None:
        raise DatasetError(f"{where}: category id {category_id!r} is unknown")
    names: Sequence[str] = category.get("keypoints") or []
    values = annotation["keypoints"]
    if not isinstance(values, list) or len(values) != 3 * len(names):
        raise DatasetError(
            f"{where}: 'keypoints' must hold {3 * len(names)} numbers "
            f"(x, y, v for each of {len(names)} names)"
        )
    points = []
    for index, name in enumerate(names):
        x, y, visibility = values[3 * index : 3 * index + 3]
        if visibility <= 0:
            continue
        phrase = template.format(name=label_phrase(name), category=category["name"])
        point = normalize_point((x, y), size, where=f"{where} keypoint {name}", strict=strict)
        points.append((phrase, point))
    return points


def read_coco_keypoints(
    annotation_file: str | Path,
    image_root: str | Path | None = None,
    *,
    template: str = "{name}",
    strict: bool = False,
) -> SampleList:
    """Read COCO keypoint annotations into point samples.

    Args:
        annotation_file: The COCO JSON file with ``keypoints`` in its categories.
        image_root: Folder of the images; defaults to the JSON file's folder.
        template: Prompt template using ``{name}`` (keypoint, with spaces) and
            optionally ``{category}``.
        strict: Refuse keypoints outside the image and missing images instead of
            clamping or skipping them with a warning.

    Raises:
        DatasetError: Naming the file and annotation, for a category without keypoint
            names, keypoints of the wrong length, or an unknown category id.
    """
    path = Path(annotation_file)
    source = str(path)
    data = read_coco_file(path)
    categories = coco_categories(data, source)
    if not any(category.get("keypoints") for category in categories.values()):
        raise DatasetError(f"{path}: no category lists 'keypoints'; not a keypoint file")
    root = Path(image_root) if image_root is not None else default_image_root(path)
    table = coco_image_table(data, source, root, strict=strict)
    prompts: dict[int, dict[str, list[Point]]] = {image_id: {} for image_id in table}
    for position, annotation in enumerate(data["annotations"]):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        if image_id not in table or "keypoints" not in annotation:
            continue
        where = f"{source} annotations[{position}] (id {annotation.get('id')})"
        points = _visible_points(
            annotation, categories, template, table[image_id][1], where, strict
        )
        for phrase, point in points:
            prompts[image_id].setdefault(phrase, []).append(point)
    samples = [
        PointSample(
            image=str(table[image_id][0]),
            object=phrase,
            points=tuple(points),
            id=f"{table[image_id][0].name}#{phrase}",
            image_size=table[image_id][1],
        )
        for image_id, by_phrase in prompts.items()
        for phrase, points in by_phrase.items()
    ]
    return SampleList(samples)


CELEBA_LANDMARKS = ("left eye", "right eye", "nose", "left mouth corner", "right mouth corner")
"""CelebA's five landmarks, in the order of its ``list_landmarks_align_celeba.txt``."""


class CelebALandmarks(Dataset):
    """Point samples from torchvision's ``CelebA(target_type="landmarks")``.

    Sample ``k`` is landmark ``k % 5`` of image ``k // 5``. Images are read from the
    dataset's files where it exposes them (no decoding to build a sample), else fetched
    from the dataset in the worker.

    Args:
        dataset: A ``torchvision.datasets.CelebA`` with ``target_type="landmarks"``, or
            any dataset of ``(image, landmarks)`` with 10 pixel values per image.
        names: Phrase of each landmark, in order.
        strict: Refuse landmarks outside the image instead of clamping them.
    """

    def __init__(
        self, dataset: Any, names: Sequence[str] = CELEBA_LANDMARKS, *, strict: bool = False
    ) -> None:
        target_type = getattr(dataset, "target_type", ["landmarks"])
        if list(target_type) != ["landmarks"]:
            raise ValueError(f"CelebA must have target_type='landmarks', got {target_type!r}")
        self.dataset = dataset
        self.names = tuple(names)
        self.strict = strict

    def __len__(self) -> int:
        return len(self.dataset) * len(self.names)

    def _image_and_landmarks(self, index: int) -> tuple[Any, Sequence[float], str]:
        landmarks = getattr(self.dataset, "landmarks_align", None)
        filenames = getattr(self.dataset, "filename", None)
        if landmarks is not None and filenames is not None:
            folder = Path(self.dataset.root) / self.dataset.base_folder / "img_align_celeba"
            path = folder / filenames[index]
            return str(path), [float(value) for value in landmarks[index]], str(path)
        image, target = self.dataset[index]
        name = f"item {index} of {type(self.dataset).__name__}"
        return as_image(image, name), [float(value) for value in target], name

    def __getitem__(self, index: int) -> PointSample:
        image_index, landmark = divmod(index, len(self.names))
        image, values, name = self._image_and_landmarks(image_index)
        if len(values) != 2 * len(self.names):
            raise DatasetError(
                f"{name}: {len(values)} landmark values for {len(self.names)} landmarks"
            )
        try:
            size = displayed_size(image)
        except ImageError as exc:
            raise DatasetError(str(exc)) from exc
        where = f"{name} landmark {self.names[landmark]}"
        point = normalize_point(
            values[2 * landmark : 2 * landmark + 2], size, where=where, strict=self.strict
        )
        return PointSample(
            image=image,
            object=self.names[landmark],
            points=(point,),
            id=f"{Path(name).name}#{self.names[landmark]}",
            image_size=size,
        )
