"""Torchvision detection datasets to annotated images, then to samples of any skill.

Any dataset that ``torchvision.datasets.wrap_dataset_for_transforms_v2`` supports for
boxes works (``CocoDetection``, ``VOCDetection``, ``Kitti``, ``WIDERFace``, ``CelebA``
with ``target_type="bbox"``, ...). ``CocoDetection`` and ``VOCDetection`` are read from
their annotation files directly: no image is decoded to list the prompts, and VOC class
names are taken from the files instead of the fixed 20 VOC classes the wrapper knows.
Other datasets are scanned once through the wrapper (which decodes each image) and
their images fetched again from the dataset when a sample is built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lightning_moondream.api.models import Box
from lightning_moondream.data.errors import DatasetError
from lightning_moondream.data.geometry import normalize_box
from lightning_moondream.data.records import AnnotatedImage, DatasetItemImage
from lightning_moondream.data.sources.coco import read_coco
from lightning_moondream.data.sources.voc import parse_voc_xml, voc_images

_DEFAULT_NAMES = {"WIDERFace": ["face"], "CelebA": ["face"]}


def _label_names(dataset: Any, class_names: Sequence[str] | Mapping[int, str] | None) -> Any:
    if class_names is not None:
        return class_names
    from torchvision.tv_tensors import _dataset_wrapper

    name = type(dataset).__name__
    if name == "Kitti":
        return _dataset_wrapper.KITTI_CATEGORIES
    if name in _DEFAULT_NAMES:
        return _DEFAULT_NAMES[name]
    raise DatasetError(f"{name}: class names are unknown; pass class_names=[...] (by label index)")


def _scan(
    dataset: Any, class_names: Sequence[str] | Mapping[int, str] | None, strict: bool
) -> tuple[list[AnnotatedImage], list[str]]:
    from torchvision.datasets import wrap_dataset_for_transforms_v2

    names = _label_names(dataset, class_names)
    wrapped = wrap_dataset_for_transforms_v2(dataset)
    images = []
    for index in range(len(wrapped)):
        where = f"item {index} of {type(dataset).__name__}"
        _, target = wrapped[index]
        target = target or {}
        raw_boxes = target.get("boxes", target.get("bbox"))
        if raw_boxes is None or len(raw_boxes) == 0:
            images.append(AnnotatedImage(DatasetItemImage(dataset, index), (), (), where))
            continue
        height, width = raw_boxes.canvas_size
        labels = target.get("labels")
        label_ids = [0] * len(raw_boxes) if labels is None else [int(label) for label in labels]
        boxes: list[Box] = []
        kept: list[str] = []
        for position, (xyxy, label) in enumerate(zip(raw_boxes.tolist(), label_ids, strict=True)):
            try:
                name = names[label]
            except (IndexError, KeyError) as exc:
                raise DatasetError(
                    f"{where} box {position}: label {label} has no class name"
                ) from exc
            box = normalize_box(
                xyxy, (width, height), where=f"{where} box {position}", strict=strict
            )
            if box is not None:
                boxes.append(box)
                kept.append(str(name))
        images.append(
            AnnotatedImage(
                DatasetItemImage(dataset, index), tuple(boxes), tuple(kept), where, (width, height)
            )
        )
    values = names.values() if isinstance(names, Mapping) else names
    return images, [str(name) for name in values]


def torchvision_images(
    dataset: Dataset,
    *,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    strict: bool = False,
) -> tuple[list[AnnotatedImage], list[str]]:
    """Read the boxes of a torchvision detection dataset.

    Args:
        dataset: A torchvision detection dataset, without transforms.
        class_names: Class name of each label (a list by index or a mapping); needed
            for datasets whose labels are bare numbers and whose names torchvision does
            not hold. Ignored for ``CocoDetection`` and ``VOCDetection``.
        strict: Refuse boxes outside the image or without area instead of clamping or
            dropping them with a warning.

    Returns:
        The annotated images, in dataset order, and the class names.

    Raises:
        DatasetError: Naming the item or file, for malformed annotations or labels
            without a name.
    """
    from torchvision.datasets import CocoDetection, VOCDetection

    if isinstance(dataset, CocoDetection):
        return read_coco(
            f"CocoDetection({dataset.root})",
            dataset.root,
            data=dataset.coco.dataset,
            image_ids=dataset.ids,
            strict=strict,
        )
    if isinstance(dataset, VOCDetection):
        parsed = [
            (parse_voc_xml(Path(xml)), Path(image))
            for xml, image in zip(dataset.targets, dataset.images, strict=True)
        ]
        return voc_images(parsed, strict=strict)
    return _scan(dataset, class_names, strict)
