"""``load_dataset``: find a dataset's format and turn it into a dataset of samples.

Formats, tried in this order when ``format`` is not given (one registry,
:data:`FORMAT_REGISTRY`, each entry telling whether a path is in its format):

- ``"huggingface"``: a ``save_to_disk`` folder, parquet/arrow files, or a hub name
  (``owner/name``) in the local cache (see
  :mod:`lightning_moondream.data.sources.huggingface`);
- ``"jsonl"``: a ``.jsonl`` manifest (see :mod:`lightning_moondream.data.sources.jsonl`),
  or a folder holding exactly one;
- ``"yolo"``: a ``data.yaml``, or a folder with ``data.yaml`` or ``classes.txt`` and
  ``images/`` (Ultralytics and Roboflow exports);
- ``"cvat"``: a CVAT for images 1.1 XML file, or a folder holding exactly one;
- ``"voc"``: a devkit folder (``ImageSets/Main``, ``Annotations``, ``JPEGImages``) or a
  folder of VOC XML files (directly or in ``annotations/``);
- ``"labelstudio"``: a Label Studio JSON export (a list of tasks), or a folder holding
  exactly one;
- ``"labelme"``: a LabelMe JSON file, or a folder of them;
- ``"coco"``: a COCO ``.json`` file, a folder holding exactly one (directly or in
  ``annotations/``), or a root with ``annotations/instances_<split>.json``.

A folder in none of these formats whose subfolders are named like splits (``train/``,
``valid/``, ``test/``, as Roboflow exports COCO, VOC and others) is read one split folder
at a time. Splits are chosen by :mod:`~lightning_moondream.data.splits`, the same for
every format: ``val`` and ``valid`` are one split; without ``split``, the training split
(or the only one).

Detection formats become samples of the chosen ``skill``: ``"detect"`` (one per image
and class present, plus seeded negatives), ``"point"`` (the same prompts, ground truth
the keypoints of the class where the format has them, else the boxes a point must fall
in; or, for COCO keypoint files with ``keypoints=True``, one prompt per visible keypoint
name) or ``"query"`` (counting and presence questions).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from torch.utils.data import Dataset

from lightning_moondream.data.classes import annotated_classes, report_rare_classes
from lightning_moondream.data.errors import DatasetError
from lightning_moondream.data.records import AnnotatedImage, DetectionPrompts
from lightning_moondream.data.sources.coco import (
    coco_groups,
    coco_split_files,
    read_coco,
    read_coco_file,
)
from lightning_moondream.data.sources.cvat import find_cvat, read_cvat
from lightning_moondream.data.sources.files import sniff_json, xml_root_tag
from lightning_moondream.data.sources.huggingface import (
    RowQuestions,
    has_questions,
    huggingface_splits,
    is_huggingface,
    read_huggingface,
)
from lightning_moondream.data.sources.jsonl import read_jsonl
from lightning_moondream.data.sources.keypoints import read_coco_keypoints
from lightning_moondream.data.sources.labelme import find_labelme, read_labelme
from lightning_moondream.data.sources.labelstudio import find_label_studio, read_label_studio
from lightning_moondream.data.sources.query import QUESTION_KINDS, DetectionQuestions
from lightning_moondream.data.sources.torchvision import torchvision_images
from lightning_moondream.data.sources.voc import (
    is_voc_devkit,
    read_voc_devkit,
    read_voc_flat,
    voc_annotation_folder,
)
from lightning_moondream.data.sources.yolo import available_splits, is_yolo, read_yolo
from lightning_moondream.data.splits import choose_split, refuse_split, split_folders

PromptSkill = Literal["detect", "point", "query"]


class Records(NamedTuple):
    """What a detection reader found: annotated images and their classes.

    Attributes:
        images: The annotated images.
        classes: Every class the dataset declares, in its order.
        groups: Names grouping other classes (COCO supercategories), never negatives.
    """

    images: list[AnnotatedImage]
    classes: list[str]
    groups: frozenset[str] = frozenset()


def build_prompts(
    images: Sequence[AnnotatedImage],
    classes: Sequence[str],
    *,
    skill: PromptSkill = "detect",
    template: str = "{name}",
    negative_rate: float = 0.0,
    seed: int = 0,
    questions: Sequence[str] = QUESTION_KINDS,
    groups: Collection[str] = (),
    phrase_labels: bool = False,
    where: str = "dataset",
) -> Dataset:
    """Turn annotated images into detect, point or query samples.

    Classes follow :mod:`~lightning_moondream.data.classes`: rare ones are reported (a
    warning names them), and negatives skip ``groups`` and classes whose name is part of
    a present class's name.

    Args:
        images: The annotated images.
        classes: Every class name.
        skill: ``"detect"``, ``"point"`` (containment of the boxes) or ``"query"``.
        template: Object phrase template with ``{name}`` (detect and point).
        negative_rate: Probability, per image and absent class, of a prompt about it.
        seed: Seed of the negative draws.
        questions: For query, which of ``"count"`` and ``"presence"`` to ask.
        groups: Names grouping other classes (supercategories), never negatives.
        phrase_labels: Write class names as phrases in prompts (``black-king`` as
            ``black king``).
        where: The dataset, for warnings.
    """
    if skill not in ("detect", "point", "query"):
        raise ValueError(f"skill must be detect, point or query, got {skill!r}")
    report_rare_classes(images, classes, where)
    # Both kinds of samples draw negatives and phrase labels alike.
    common: dict[str, Any] = {
        "negative_rate": negative_rate,
        "seed": seed,
        "groups": groups,
        "phrase_labels": phrase_labels,
    }
    if skill == "query":
        return DetectionQuestions(images, classes, kinds=questions, **common)
    return DetectionPrompts(images, classes, skill=skill, template=template, **common)


@dataclass(frozen=True)
class _Prompting:
    """The arguments of :func:`build_prompts` that say which samples to make."""

    skill: PromptSkill
    template: str
    negative_rate: float
    seed: int
    questions: Sequence[str]
    phrase_labels: bool

    def samples(self, records: Records, where: str) -> Dataset:
        """The samples of what a reader found."""
        return build_prompts(
            records.images, records.classes, groups=records.groups, where=where, **asdict(self)
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
    phrase_labels: bool = False,
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
        phrase_labels: Write class names as phrases in prompts (``black-king`` as
            ``black king``).
    """
    images, classes = torchvision_images(dataset, class_names=class_names, strict=strict)
    prompting = _Prompting(skill, template, negative_rate, seed, questions, phrase_labels)
    return prompting.samples(Records(images, classes), where=type(dataset).__name__)


@dataclass(frozen=True)
class ReadSettings:
    """What every reader may need beyond the path and the split.

    Attributes:
        strict: Refuse instead of clamping or dropping with a warning.
        image_root: The images' folder, for formats whose annotations sit apart.
        skill: The skill asked for (JSONL keeps only lines of it).
        keypoints: COCO: prompt keypoint names instead of classes.
        template: Prompt template (COCO keypoints build their samples themselves).
        options: Format-specific options, passed on to the reader.
    """

    strict: bool = False
    image_root: str | None = None
    skill: str | None = None
    keypoints: bool = False
    template: str = "{name}"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.keypoints and self.skill != "point":
            raise ValueError("keypoints=True needs a COCO keypoint file and skill='point'")


@dataclass(frozen=True)
class DatasetFormat:
    """One entry of the format registry.

    Attributes:
        name: The ``format=`` value.
        find: The file or folder to read if a path is in this format, else ``None``.
        read: Reads a found target and a split (``None``: the default) into annotated
            images and classes, or directly into a dataset of samples.
        expected: What a path of this format looks like, for messages.
        splits: The split names of a found target (empty without splits).
    """

    name: str
    find: Callable[[Path], Path | None]
    read: Callable[[Path, str | None, ReadSettings], Records | Dataset]
    expected: str
    splits: Callable[[Path], list[str]] = lambda target: []


def _single(files: list[Path], root: Path, kind: str) -> Path | None:
    if len(files) > 1:
        names = ", ".join(path.name for path in files)
        raise DatasetError(f"{root}: several {kind} files ({names}); pass the one to use")
    return files[0] if files else None


def _find_huggingface(path: Path) -> Path | None:
    return path if is_huggingface(path) else None


def _read_huggingface(target: Path, split: str | None, settings: ReadSettings) -> Records | Dataset:
    options = dict(settings.options)
    if settings.skill == "query" and has_questions(target, split, **options):
        return RowQuestions(target, split, **options)
    return Records(*read_huggingface(target, split, strict=settings.strict, **options))


def _find_jsonl(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".jsonl" else None
    return _single(sorted(path.glob("*.jsonl")), path, "JSONL")


def _read_jsonl(target: Path, split: str | None, settings: ReadSettings) -> Dataset:
    refuse_split(split, str(target))
    return read_jsonl(target, skill=settings.skill, strict=settings.strict, **settings.options)


def _find_yolo(path: Path) -> Path | None:
    return path if is_yolo(path) else None


def _read_yolo(target: Path, split: str | None, settings: ReadSettings) -> Records:
    return Records(*read_yolo(target, split, strict=settings.strict, **settings.options))


def _read_cvat(target: Path, split: str | None, settings: ReadSettings) -> Records:
    refuse_split(split, str(target))
    return Records(
        *read_cvat(target, settings.image_root, strict=settings.strict, **settings.options)
    )


def _find_voc(path: Path) -> Path | None:
    if path.is_file():
        return None
    if is_voc_devkit(path):
        return path
    first = next(iter(sorted(voc_annotation_folder(path).glob("*.xml"))), None)
    return path if first is not None and xml_root_tag(first) == "annotation" else None


def _voc_splits(target: Path) -> list[str]:
    if not is_voc_devkit(target):
        return []
    # ImageSets/Main also holds per-class lists such as ``dog_train.txt``.
    return sorted(
        path.stem for path in (target / "ImageSets" / "Main").glob("*.txt") if "_" not in path.stem
    )


def _read_voc(target: Path, split: str | None, settings: ReadSettings) -> Records:
    if is_voc_devkit(target):
        chosen = choose_split(_voc_splits(target), split, str(target))
        return Records(
            *read_voc_devkit(target, chosen or "train", strict=settings.strict, **settings.options)
        )
    refuse_split(split, str(target))
    return Records(*read_voc_flat(target, strict=settings.strict, **settings.options))


def _read_label_studio(target: Path, split: str | None, settings: ReadSettings) -> Records:
    refuse_split(split, str(target))
    return Records(
        *read_label_studio(target, settings.image_root, strict=settings.strict, **settings.options)
    )


def _read_labelme(target: Path, split: str | None, settings: ReadSettings) -> Records:
    refuse_split(split, str(target))
    return Records(*read_labelme(target, strict=settings.strict, **settings.options))


def _is_coco_json(path: Path) -> bool:
    return path.suffix == ".json" and sniff_json(path) == "object"


def _find_coco(path: Path) -> Path | None:
    if path.is_file():
        return path if _is_coco_json(path) else None
    if coco_split_files(path):
        return path
    candidates = [
        file
        for folder in (path, path / "annotations")
        if folder.is_dir()
        for file in sorted(folder.glob("*.json"))
        if _is_coco_json(file)
    ]
    return _single(candidates, path, "COCO JSON")


def _coco_splits(target: Path) -> list[str]:
    return list(coco_split_files(target)) if target.is_dir() else []


def _read_coco(target: Path, split: str | None, settings: ReadSettings) -> Records | Dataset:
    image_root = settings.image_root
    if target.is_dir():
        prefix = "person_keypoints" if settings.keypoints else "instances"
        files = coco_split_files(target, prefix)
        if not files:
            raise DatasetError(f"{target}: no annotations/{prefix}_<split>.json file")
        target, folder = files[choose_split(list(files), split, str(target)) or ""]
        image_root = image_root or str(folder)
    else:
        refuse_split(split, str(target))
    if settings.keypoints:
        return read_coco_keypoints(
            target, image_root, template=settings.template, strict=settings.strict
        )
    data = read_coco_file(target)
    images, classes = read_coco(
        target, image_root, strict=settings.strict, data=data, **settings.options
    )
    return Records(images, annotated_classes(images, classes, str(target)), coco_groups(data))


FORMAT_REGISTRY: dict[str, DatasetFormat] = {
    entry.name: entry
    for entry in (
        DatasetFormat(
            "huggingface",
            _find_huggingface,
            _read_huggingface,
            "a Hugging Face save_to_disk folder, parquet/arrow files, or a cached hub name",
            huggingface_splits,
        ),
        DatasetFormat("jsonl", _find_jsonl, _read_jsonl, "a .jsonl manifest"),
        DatasetFormat(
            "yolo",
            _find_yolo,
            _read_yolo,
            "a data.yaml, or classes.txt beside images/",
            available_splits,
        ),
        DatasetFormat("cvat", find_cvat, _read_cvat, "a CVAT for images 1.1 XML file"),
        DatasetFormat(
            "voc", _find_voc, _read_voc, "VOC XML files, or a devkit folder", _voc_splits
        ),
        DatasetFormat(
            "labelstudio",
            find_label_studio,
            _read_label_studio,
            "a Label Studio JSON export (a list of tasks)",
        ),
        DatasetFormat("labelme", find_labelme, _read_labelme, "LabelMe JSON files"),
        DatasetFormat(
            "coco",
            _find_coco,
            _read_coco,
            "a COCO JSON file, or annotations/instances_<split>.json",
            _coco_splits,
        ),
    )
}
"""Every dataset format, in detection order."""

FORMATS: tuple[str, ...] = tuple(FORMAT_REGISTRY)


@dataclass(frozen=True)
class Located:
    """Where a dataset path's annotations are.

    Attributes:
        format: The format.
        target: The file or folder its reader reads.
        split_folders: For a root of split folders, each split's folder (the target is
            then found in the chosen one); empty otherwise.
    """

    format: DatasetFormat
    target: Path
    split_folders: Mapping[str, Path] = field(default_factory=dict)


def _find(path: Path, format: str | None) -> tuple[DatasetFormat, Path] | None:
    if format is not None:
        if format not in FORMAT_REGISTRY:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        entry = FORMAT_REGISTRY[format]
        target = entry.find(path)
        return (entry, target) if target is not None else None
    for entry in FORMAT_REGISTRY.values():
        target = entry.find(path)
        if target is not None:
            return entry, target
    return None


def locate(path: str | Path, format: str | None = None) -> Located:
    """Find the format of a dataset path and what to read.

    Raises:
        DatasetError: If the path does not exist or no format matches.
        ValueError: For an unknown ``format``.
    """
    path = Path(path)
    if format in (None, "huggingface") and not path.exists() and is_huggingface(path):
        # A hub name (owner/name) is no path: it is read from the local cache.
        return Located(FORMAT_REGISTRY["huggingface"], path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    found = _find(path, format)
    if found is not None:
        return Located(*found)
    folders = split_folders(path)
    for folder in folders.values():
        inner = _find(folder, format)
        if inner is not None:
            return Located(inner[0], path, folders)
    if format is not None:
        raise DatasetError(
            f"{path}: not a {format} dataset; expected {FORMAT_REGISTRY[format].expected}"
        )
    raise DatasetError(
        f"{path}: no dataset format recognized; expected "
        + "; ".join(f"{entry.name}: {entry.expected}" for entry in FORMAT_REGISTRY.values())
    )


def detect_format(path: str | Path) -> tuple[str, Path]:
    """Find the format of a dataset path and the file or folder to read.

    Raises:
        DatasetError: If the path does not exist or no format matches.
    """
    located = locate(path)
    return located.format.name, located.target


def dataset_splits(path: str | Path, format: str | None = None) -> list[str]:
    """The split names of a dataset path; empty for a dataset without splits.

    Raises:
        DatasetError: If the path does not exist or no format matches.
    """
    located = locate(path, format)
    if located.split_folders:
        return list(located.split_folders)
    return located.format.splits(located.target)


def read_records(
    path: str | Path,
    *,
    format: str | None = None,
    split: str | None = None,
    settings: ReadSettings | None = None,
) -> Records | Dataset:
    """Read a dataset path's annotations: annotated images and classes, or samples.

    Raises:
        DatasetError: Naming the file and annotation, for anything that cannot be read.
    """
    located = locate(path, format)
    settings = settings or ReadSettings()
    if settings.keypoints and located.format.name != "coco":
        raise ValueError("keypoints=True needs a COCO keypoint file and skill='point'")
    if not located.split_folders:
        return located.format.read(located.target, split, settings)
    names = list(located.split_folders)
    folder = located.split_folders[choose_split(names, split, str(located.target)) or names[0]]
    inner = _find(folder, located.format.name)
    if inner is None:
        raise DatasetError(
            f"{folder}: not a {located.format.name} dataset like the other split folders; "
            f"expected {located.format.expected}"
        )
    return located.format.read(inner[1], None, settings)


def load_dataset(
    path: str | Path,
    *,
    format: str | None = None,
    split: str | None = None,
    skill: PromptSkill | None = None,
    template: str = "{name}",
    negative_rate: float = 0.0,
    seed: int = 0,
    questions: Sequence[str] = QUESTION_KINDS,
    keypoints: bool = False,
    image_root: str | None = None,
    strict: bool = False,
    phrase_labels: bool = False,
    **options: Any,
) -> Dataset:
    """Load a dataset folder or annotation file as a map-style dataset of samples.

    Annotations are read and validated now (cheap); images are only opened for their
    size where a format needs it, and decoded when samples are encoded.

    Args:
        path: A folder, or an annotation file (``.json``, ``.jsonl``, ``.xml``, ``data.yaml``).
        format: One of :data:`FORMATS`; detected if ``None``.
        split: The split, for datasets with splits (YOLO, VOC devkit, COCO
            ``annotations/instances_<split>.json``, split folders, Hugging Face);
            ``None`` means the training split, or the only one. ``val``, ``valid`` and
            ``validation`` name one split.
        skill: Samples to make from boxes: ``"detect"`` (the default), ``"point"`` or
            ``"query"``. For JSONL, keeps only lines of this skill (default: all).
        template: Object phrase template with ``{name}``; for COCO keypoints,
            ``{name}`` is the keypoint and ``{category}`` its category.
        negative_rate: Probability, per image and absent class, of a prompt about it.
        seed: Seed of the negative draws.
        questions: For query, which of ``"count"`` and ``"presence"`` to ask.
        keypoints: COCO with ``skill="point"``: prompt keypoint names instead of classes.
        image_root: COCO, CVAT and Label Studio: the images' folder, if not beside
            the annotation file.
        strict: Refuse (instead of clamping or dropping with a warning) boxes outside
            the image or without area, and missing images.
        phrase_labels: Write class names as phrases in prompts (``black-king`` as
            ``black king``, ``traffic_light`` as ``traffic light``); sample ids keep the
            names. Detection formats only.
        **options: Format-specific options: ``coordinates`` (JSONL), ``classes`` and
            ``include_difficult`` (VOC), ``include_crowd`` (COCO).

    Returns:
        A ``torch.utils.data.Dataset`` whose items are samples.

    Raises:
        DatasetError: Naming the file and annotation, for anything that cannot be read.
    """
    settings = ReadSettings(strict, image_root, skill, keypoints, template, options)
    records = read_records(path, format=format, split=split, settings=settings)
    if isinstance(records, Dataset):
        return records
    prompting = _Prompting(
        skill or "detect", template, negative_rate, seed, questions, phrase_labels
    )
    return prompting.samples(records, where=str(path))
