"""``load_dataset``: find a folder's format and turn it into a dataset of samples.

Formats, detected in this order when ``format`` is not given:

- ``"jsonl"``: a ``.jsonl`` manifest (see :mod:`lightning_moondream.data.sources.jsonl`),
  or a folder holding exactly one;
- ``"yolo"``: a ``data.yaml``, or a folder with ``data.yaml`` or ``classes.txt`` and
  ``images/``;
- ``"voc"``: a devkit folder (``ImageSets/Main``, ``Annotations``, ``JPEGImages``) or a
  folder of VOC XML files (directly or in ``annotations/``);
- ``"coco"``: a COCO ``.json`` file, or a folder holding exactly one (directly or in
  ``annotations/``);
- ``"huggingface"``: a ``save_to_disk`` folder, parquet/arrow files, or a hub name
  (``owner/name``) in the local cache (see
  :mod:`lightning_moondream.data.sources.huggingface`).

Detection formats become samples of the chosen ``skill``: ``"detect"`` (one per image
and class present, plus seeded negatives), ``"point"`` (the same prompts, ground truth
the boxes a point must fall in; or, for COCO keypoint files with ``keypoints=True``, one
prompt per visible keypoint name) or ``"query"`` (counting and presence questions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from lightning_moondream.data.errors import DatasetError
from lightning_moondream.data.records import AnnotatedImage, DetectionPrompts
from lightning_moondream.data.sources.coco import read_coco
from lightning_moondream.data.sources.huggingface import (
    RowQuestions,
    has_questions,
    is_huggingface,
    read_huggingface,
)
from lightning_moondream.data.sources.jsonl import read_jsonl
from lightning_moondream.data.sources.keypoints import read_coco_keypoints
from lightning_moondream.data.sources.query import QUESTION_KINDS, DetectionQuestions
from lightning_moondream.data.sources.torchvision import torchvision_images
from lightning_moondream.data.sources.voc import (
    is_voc_devkit,
    is_voc_flat,
    read_voc_devkit,
    read_voc_flat,
)
from lightning_moondream.data.sources.yolo import is_yolo, read_yolo

Format = Literal["coco", "voc", "yolo", "jsonl", "huggingface"]
FORMATS: tuple[str, ...] = ("coco", "voc", "yolo", "jsonl", "huggingface")
PromptSkill = Literal["detect", "point", "query"]


def build_prompts(
    images: Sequence[AnnotatedImage],
    classes: Sequence[str],
    *,
    skill: PromptSkill = "detect",
    template: str = "{name}",
    negative_rate: float = 0.0,
    seed: int = 0,
    questions: Sequence[str] = QUESTION_KINDS,
) -> Dataset:
    """Turn annotated images into detect, point or query samples.

    Args:
        images: The annotated images.
        classes: Every class name.
        skill: ``"detect"``, ``"point"`` (containment of the boxes) or ``"query"``.
        template: Object phrase template with ``{name}`` (detect and point).
        negative_rate: Probability, per image and absent class, of a prompt about it.
        seed: Seed of the negative draws.
        questions: For query, which of ``"count"`` and ``"presence"`` to ask.
    """
    if skill == "query":
        return DetectionQuestions(
            images, classes, kinds=questions, negative_rate=negative_rate, seed=seed
        )
    if skill not in ("detect", "point"):
        raise ValueError(f"skill must be detect, point or query, got {skill!r}")
    return DetectionPrompts(
        images, classes, skill=skill, template=template, negative_rate=negative_rate, seed=seed
    )


def from_torchvision(
    dataset: Dataset,
    *,
    skill: PromptSkill = "detect",
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    template: str = "{name}",
    negative_rate: float = 0.0,
    seed: int = 0,
    questions: Sequence[str] = QUESTION_KINDS,
    strict: bool = False,
) -> Dataset:
    """Turn a torchvision detection dataset into samples (see :func:`build_prompts`).

    Args:
        dataset: ``CocoDetection``, ``VOCDetection``, ``Kitti``, ``WIDERFace``, or any
            dataset ``wrap_dataset_for_transforms_v2`` supports with boxes.
        skill: ``"detect"``, ``"point"`` or ``"query"``.
        class_names: Class name of each label, where torchvision does not know them.
        template: Object phrase template with ``{name}``.
        negative_rate: Probability, per image and absent class, of a prompt about it.
        seed: Seed of the negative draws.
        questions: For query, which of ``"count"`` and ``"presence"`` to ask.
        strict: Refuse boxes outside the image or without area.
    """
    images, classes = torchvision_images(dataset, class_names=class_names, strict=strict)
    return build_prompts(
        images,
        classes,
        skill=skill,
        template=template,
        negative_rate=negative_rate,
        seed=seed,
        questions=questions,
    )


def _single(files: list[Path], root: Path, kind: str) -> Path | None:
    if len(files) > 1:
        names = ", ".join(path.name for path in files)
        raise DatasetError(f"{root}: several {kind} files ({names}); pass the one to use")
    return files[0] if files else None


def _coco_file(root: Path) -> Path | None:
    candidates = [
        path
        for folder in (root, root / "annotations")
        if folder.is_dir()
        for path in sorted(folder.glob("*.json"))
    ]
    return _single(candidates, root, "COCO JSON")


def detect_format(path: str | Path) -> tuple[Format, Path]:
    """Find the format of a dataset path and the file or folder to read.

    Raises:
        DatasetError: If the path does not exist or no format matches.
    """
    path = Path(path)
    if is_huggingface(path):
        return "huggingface", path
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".jsonl":
            return "jsonl", path
        if path.suffix in (".yaml", ".yml"):
            return "yolo", path
        if path.suffix == ".json":
            return "coco", path
        raise DatasetError(f"{path}: unknown annotation file type; expected .json, .jsonl or .yaml")
    manifest = _single(sorted(path.glob("*.jsonl")), path, "JSONL")
    if manifest is not None:
        return "jsonl", manifest
    if is_yolo(path):
        return "yolo", path
    if is_voc_devkit(path) or is_voc_flat(path):
        return "voc", path
    coco = _coco_file(path)
    if coco is not None:
        return "coco", coco
    raise DatasetError(
        f"{path}: no dataset format recognized (COCO JSON, VOC XML, YOLO data.yaml or "
        "classes.txt, JSONL manifest, Hugging Face dataset)"
    )


def load_dataset(
    path: str | Path,
    *,
    format: Format | None = None,
    split: str | None = None,
    skill: PromptSkill | None = None,
    template: str = "{name}",
    negative_rate: float = 0.0,
    seed: int = 0,
    questions: Sequence[str] = QUESTION_KINDS,
    keypoints: bool = False,
    image_root: str | None = None,
    strict: bool = False,
    **options: Any,
) -> Dataset:
    """Load a dataset folder or annotation file as a map-style dataset of samples.

    Annotations are read and validated now (cheap); images are only opened for their
    size where a format needs it, and decoded when samples are encoded.

    Args:
        path: A folder, or an annotation file (``.json``, ``.jsonl``, ``data.yaml``).
        format: ``"coco"``, ``"voc"``, ``"yolo"``, ``"jsonl"`` or ``"huggingface"``;
            detected if ``None``.
        split: The split for formats with splits (VOC devkit, YOLO); ``None`` means
            ``"train"`` there (Hugging Face: the only split, else validation, test, train).
        skill: Samples to make from boxes: ``"detect"`` (the default), ``"point"`` or
            ``"query"``. For JSONL, keeps only lines of this skill (default: all).
        template: Object phrase template with ``{name}``; for COCO keypoints,
            ``{name}`` is the keypoint and ``{category}`` its category.
        negative_rate: Probability, per image and absent class, of a prompt about it.
        seed: Seed of the negative draws.
        questions: For query, which of ``"count"`` and ``"presence"`` to ask.
        keypoints: For COCO with ``skill="point"``, prompt keypoint names instead of
            classes.
        image_root: COCO only: the images' folder, if not beside the JSON file.
        strict: Refuse (instead of clamping or dropping with a warning) boxes outside
            the image or without area, and missing images.
        **options: Format-specific options: ``coordinates`` (JSONL), ``classes`` and
            ``include_difficult`` (VOC), ``include_crowd`` (COCO), ``columns`` and
            ``class_names`` (Hugging Face; with ``skill="query"`` and a question column,
            one question per row).

    Returns:
        A ``torch.utils.data.Dataset`` whose items are samples.

    Raises:
        DatasetError: Naming the file and annotation, for anything that cannot be read.
    """
    if format is None:
        format, target = detect_format(path)
    elif format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    else:
        target = Path(path)
        if format == "jsonl" and target.is_dir():
            target = detect_format(target)[1]
        if format == "coco" and target.is_dir():
            found = _coco_file(target)
            if found is None:
                raise DatasetError(f"{target}: no COCO JSON file found")
            target = found
    if format == "jsonl":
        return read_jsonl(target, skill=skill, strict=strict, **options)
    if format == "huggingface" and skill == "query" and has_questions(target, split, **options):
        return RowQuestions(target, split, **options)
    if keypoints:
        if format != "coco" or skill != "point":
            raise ValueError("keypoints=True needs a COCO keypoint file and skill='point'")
        return read_coco_keypoints(target, image_root, template=template, strict=strict)
    if format == "huggingface":
        images, classes = read_huggingface(target, split, strict=strict, **options)
    elif format == "coco":
        if split is not None:
            raise DatasetError(f"{target}: a COCO file has no splits; pass the split's JSON file")
        images, classes = read_coco(target, image_root, strict=strict, **options)
    elif format == "yolo":
        images, classes = read_yolo(target, split, strict=strict, **options)
    elif is_voc_devkit(target):
        images, classes = read_voc_devkit(target, split or "train", strict=strict, **options)
    else:
        if split is not None:
            raise DatasetError(f"{target}: a flat VOC folder has no splits")
        images, classes = read_voc_flat(target, strict=strict, **options)
    return build_prompts(
        images,
        classes,
        skill=skill or "detect",
        template=template,
        negative_rate=negative_rate,
        seed=seed,
        questions=questions,
    )
