"""Samples, image encoding, dataset readers and the DataModule.

Start with :func:`load_dataset` (YOLO, COCO, VOC, CVAT, Label Studio, LabelMe and JSONL
exports, with their splits), :func:`from_torchvision`
(torchvision detection datasets), :class:`SyntheticShapes` (no files), and
:class:`MoondreamDataModule` to feed them to a Lightning trainer.

The DataModule and its helpers load on first access, so that the rest of the package
(and the local service, which draws its synthetic scenes from it) imports without
Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_moondream.data.detect import (
    FORMATS,
    build_prompts,
    dataset_splits,
    detect_format,
    from_torchvision,
    load_dataset,
)
from lightning_moondream.data.encoding import (
    DEFAULT_MAX_SIDE,
    DEFAULT_QUALITY,
    EncodedDataset,
    EncodedImageCache,
    EncodingStats,
)
from lightning_moondream.data.errors import DatasetError, DatasetWarning, MissingPackageError
from lightning_moondream.data.geometry import normalize_box, normalize_point
from lightning_moondream.data.records import (
    AnnotatedImage,
    DatasetItemImage,
    DetectionPrompts,
    SampleList,
)
from lightning_moondream.data.samples import DetectSample, PointSample, QuerySample, Sample
from lightning_moondream.data.sources.coco import read_coco
from lightning_moondream.data.sources.cvat import read_cvat
from lightning_moondream.data.sources.jsonl import read_jsonl
from lightning_moondream.data.sources.keypoints import CelebALandmarks, read_coco_keypoints
from lightning_moondream.data.sources.labelme import read_labelme
from lightning_moondream.data.sources.labelstudio import read_label_studio
from lightning_moondream.data.sources.query import ClassificationQuestions, DetectionQuestions
from lightning_moondream.data.sources.synthetic import SyntheticShapes
from lightning_moondream.data.sources.torchvision import torchvision_images
from lightning_moondream.data.sources.voc import read_voc_devkit, read_voc_flat
from lightning_moondream.data.sources.yolo import read_yolo

if TYPE_CHECKING:
    from lightning_moondream.data.module import (
        MoondreamDataModule,
        SourceSpec,
        build_mixture,
        build_source,
        collate_samples,
    )

_LAZY = {"MoondreamDataModule", "SourceSpec", "build_mixture", "build_source", "collate_samples"}
"""Names of ``lightning_moondream.data.module``, which imports Lightning."""

__all__ = [
    "DEFAULT_MAX_SIDE",
    "DEFAULT_QUALITY",
    "FORMATS",
    "AnnotatedImage",
    "CelebALandmarks",
    "ClassificationQuestions",
    "DatasetError",
    "DatasetItemImage",
    "DatasetWarning",
    "DetectSample",
    "DetectionPrompts",
    "DetectionQuestions",
    "EncodedDataset",
    "EncodedImageCache",
    "EncodingStats",
    "MissingPackageError",
    "MoondreamDataModule",
    "PointSample",
    "QuerySample",
    "Sample",
    "SampleList",
    "SourceSpec",
    "SyntheticShapes",
    "build_mixture",
    "build_prompts",
    "build_source",
    "collate_samples",
    "dataset_splits",
    "detect_format",
    "from_torchvision",
    "load_dataset",
    "normalize_box",
    "normalize_point",
    "read_coco",
    "read_coco_keypoints",
    "read_cvat",
    "read_jsonl",
    "read_label_studio",
    "read_labelme",
    "read_voc_devkit",
    "read_voc_flat",
    "read_yolo",
    "torchvision_images",
]


def __getattr__(name: str) -> Any:
    """Load the DataModule's names on first access."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module("lightning_moondream.data.module"), name)
    raise AttributeError(f"module 'lightning_moondream.data' has no attribute {name!r}")
