"""Hugging Face ``datasets``: saved folders, parquet/arrow files and cached hub datasets.

Where a dataset can come from (never downloaded at run time):

- a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``;
- a ``.parquet`` or ``.arrow`` file, or a folder of them (``train-00000-of-00002.parquet``,
  ``data/validation-*.parquet``: the split is the file name's first word or its folder);
- a hub name such as ``"vikhyatk/POPE"``, resolved from the local Hugging Face cache only.

Splits are chosen by :mod:`~lightning_moondream.data.splits`, as for every format.

Detection rows become :class:`AnnotatedImage` records through a column mapping
(:class:`Columns`), whose defaults cover the common schemas: an ``image`` column, boxes in
``objects.bbox`` (COCO-style ``xywh`` pixels) or ``objects.boxes``/``boxes`` (``xyxy``),
labels in ``objects.category``/``objects.label``/``label`` as ``ClassLabel`` indices, plain
integers with ``class_names``, or strings. Query rows give one question with its answers.

``datasets`` is imported only when a dataset of this kind is loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch.utils.data import Dataset

from lightning_moondream.api.models import Box
from lightning_moondream.data.errors import DatasetError, MissingPackageError
from lightning_moondream.data.geometry import check_normalized_box, normalize_box
from lightning_moondream.data.records import AnnotatedImage, DatasetItemImage
from lightning_moondream.data.samples import QuerySample
from lightning_moondream.data.sources.files import read_json
from lightning_moondream.data.splits import choose_split
from lightning_moondream.images import ImageError, ImageInput, displayed_size

if TYPE_CHECKING:
    from collections.abc import Iterator

    import datasets

BoxFormat = Literal["xyxy", "xywh"]
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_TABLE_SUFFIXES = (".parquet", ".arrow")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BOX_COLUMNS = ("objects.bbox", "objects.boxes", "objects.bboxes", "bbox", "boxes", "bboxes")
_LABEL_COLUMNS = (
    "objects.category",
    "objects.label",
    "objects.labels",
    "objects.category_id",
    "category",
    "labels",
    "label",
)
_QUESTION_COLUMNS = ("question", "query", "prompt")
_ANSWER_COLUMNS = ("answers", "answer", "number", "label", "class")


def _require_datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise MissingPackageError(
            "the 'datasets' package is not installed, and Hugging Face data needs it "
            "(benchmarks, hub names, save_to_disk folders, parquet and arrow files): "
            "pip install 'lightning-moondream[hf]'"
        ) from exc
    return datasets


def is_huggingface(path: str | Path) -> bool:
    """Whether ``path`` is a saved dataset, parquet/arrow data, or looks like a hub name."""
    target = Path(path)
    if target.is_file():
        return target.suffix in _TABLE_SUFFIXES
    if target.is_dir():
        return _is_saved(target) or bool(_table_files(target))
    return bool(_HUB_NAME.match(str(path)))


def _table_files(folder: Path) -> list[Path]:
    """Parquet or arrow files in ``folder`` or one level below (``data/``, ``train/``).

    Not deeper: detection runs on every dataset folder, image trees included.
    """
    return sorted(
        path
        for suffix in _TABLE_SUFFIXES
        for pattern in (f"*{suffix}", f"*/*{suffix}")
        for path in folder.glob(pattern)
        if path.is_file()
    )


def _split_of(path: Path, root: Path) -> str:
    """The split a data file belongs to: its first folder below ``root``, else its name."""
    relative = path.relative_to(root).parts
    if len(relative) > 1 and relative[0] != "data":
        return relative[0]
    return re.split(r"[-_.]", path.name, maxsplit=1)[0]


def _is_saved(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _SAVED_MARKERS)


def _tables_by_split(path: Path, where: str) -> dict[str, list[Path]]:
    """Parquet/arrow data by split; a single file, or files of one split, as one entry."""
    files = [path] if path.is_file() else _table_files(path)
    if not files:
        raise DatasetError(f"{where}: no parquet or arrow file found")
    by_split: dict[str, list[Path]] = {}
    for file in files:
        by_split.setdefault(_split_of(file, path) if path.is_dir() else "data", []).append(file)
    return by_split


def _pick(splits: Mapping[str, Any], split: str | None, where: str) -> Any:
    chosen = choose_split(list(splits), split, where)
    if chosen is None:
        raise DatasetError(f"{where}: holds no split")
    return splits[chosen]


def huggingface_splits(source: str | Path) -> list[str]:
    """The split names of a Hugging Face dataset; empty for a dataset of one split.

    Raises:
        DatasetError: Naming the source, if it is missing or unreadable.
    """
    path = Path(source)
    if _is_saved(path):
        if not (path / "dataset_dict.json").is_file():
            return []
        listed = read_json(path / "dataset_dict.json")
        splits = listed.get("splits") if isinstance(listed, dict) else None
        if not isinstance(splits, list):
            raise DatasetError(f"{path / 'dataset_dict.json'}: no 'splits' list")
        return [str(name) for name in splits]
    if path.exists():
        by_split = _tables_by_split(path, str(source))
        return list(by_split) if len(by_split) > 1 else []
    return list(_cached_hub_dataset(str(source), None))


@contextmanager
def _offline() -> Iterator[None]:
    """Make ``datasets`` and the hub client use only the local cache for a while."""
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def missing_dataset_message(name: str, split: str | None) -> str:
    """What to do when a hub dataset is not on this machine."""
    cache = os.environ.get("HF_DATASETS_CACHE") or "~/.cache/huggingface/datasets"
    wanted = f" (split {split!r})" if split else ""
    return (
        f"{name}: no such file or folder, and no Hugging Face dataset {name!r}{wanted} in "
        f"the local cache ({cache}); nothing is downloaded at run time. Place it with "
        f"`python -c \"import datasets; datasets.load_dataset('{name}')\"` on a machine with "
        "network access (copy the cache folder over if needed), or save it with "
        "`save_to_disk(FOLDER)` or as parquet files and name that folder instead"
    )


def open_dataset(source: str | Path, split: str | None = None) -> datasets.Dataset:
    """Open one split of a Hugging Face dataset, from disk or the local cache only.

    Args:
        source: A ``save_to_disk`` folder, a parquet/arrow file or folder, or a hub name.
        split: The split, by any of its names (``val`` finds ``validation``); ``None``
            picks the training split, or the only one.

    Raises:
        DatasetError: Naming the source, if it is missing, unreadable or has no such split.
    """
    hf = _require_datasets()
    path = Path(source)
    where = str(source)
    if _is_saved(path):
        try:
            loaded = hf.load_from_disk(str(path))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{where}: not a readable saved dataset ({exc})") from exc
        if isinstance(loaded, hf.DatasetDict):
            return _pick(loaded, split, where)
        if split is not None and loaded.split is not None:
            # Refuses a split other than the one saved (a name of its kind is the same).
            choose_split([str(loaded.split)], split, where)
        return loaded
    if path.exists():
        by_split = _tables_by_split(path, where)
        if len(by_split) == 1:
            return _read_tables(hf, next(iter(by_split.values())), where)
        return _read_tables(hf, _pick(by_split, split, where), where)
    return _pick(_cached_hub_dataset(where, split), split, where)


def _cached_hub_dataset(name: str, split: str | None) -> datasets.DatasetDict:
    """Every split of a hub dataset, from the local cache only."""
    hf = _require_datasets()
    if not _HUB_NAME.match(name):
        raise DatasetError(f"{name}: no such file or folder, and not a hub name like 'owner/name'")
    with _offline():
        try:
            return hf.load_dataset(name)
        except Exception as exc:
            raise DatasetError(missing_dataset_message(name, split)) from exc


def _read_tables(hf: Any, files: list[Path], where: str) -> datasets.Dataset:
    try:
        if files[0].suffix == ".arrow":
            parts = [hf.Dataset.from_file(str(file)) for file in files]
            return parts[0] if len(parts) == 1 else hf.concatenate_datasets(parts)
        return hf.Dataset.from_parquet([str(file) for file in files])
    except Exception as exc:
        raise DatasetError(f"{where}: unreadable data file ({exc})") from exc


# Rows ----------------------------------------------------------------------------------


class RowImage(DatasetItemImage):
    """The image of row ``index`` of a Hugging Face dataset, fetched when a sample is built.

    The dataset is memory-mapped, so holding it costs nothing and it pickles by its files.
    """

    def __init__(self, dataset: Any, index: int, column: str) -> None:
        super().__init__(dataset, index)
        self.column = column

    def __call__(self) -> ImageInput:
        """The image's bytes or path."""
        return image_value(self.dataset[self.index][self.column], f"row {self.index}")


def image_value(value: Any, where: str) -> ImageInput:
    """A row's image cell, undecoded (``{"bytes", "path"}``) or decoded, as an image input.

    Raises:
        DatasetError: Naming ``where``, if the cell holds no image.
    """
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return str(value["path"])
        raise DatasetError(f"{where}: image cell has neither bytes nor a path")
    if value is None:
        raise DatasetError(f"{where}: no image")
    return value


def undecoded(dataset: datasets.Dataset, column: str) -> datasets.Dataset:
    """The dataset with ``column`` left as bytes/paths, so listing rows decodes no image."""
    hf = _require_datasets()
    feature = dataset.features.get(column)
    if isinstance(feature, hf.Image) and feature.decode:
        return dataset.cast_column(column, hf.Image(decode=False))
    return dataset


def image_column(dataset: datasets.Dataset, given: str | None, where: str) -> str:
    """The image column: ``given``, else ``image``/``img``, else the only Image feature."""
    hf = _require_datasets()
    names = list(dataset.column_names)
    if given is not None:
        if given not in names:
            raise DatasetError(f"{where}: no column {given!r}; columns: {', '.join(names)}")
        return given
    for name in ("image", "img"):
        if name in names:
            return name
    images = [name for name, feature in dataset.features.items() if isinstance(feature, hf.Image)]
    if len(images) == 1:
        return images[0]
    raise DatasetError(f"{where}: no image column found; columns: {', '.join(names)}")


def cell(row: Mapping[str, Any], column: str, where: str) -> Any:
    """The value of a dotted column (``objects.bbox``) of a row.

    Raises:
        DatasetError: Naming the row and column, if it is absent.
    """
    value: Any = row
    for part in column.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and all(isinstance(item, Mapping) for item in value):
            # A list of objects (``objects: [{bbox, category}, ...]``) read as columns.
            value = [item.get(part) for item in value]
        else:
            raise DatasetError(f"{where}: no column {column!r}")
    return value


def _has_column(features: Mapping[str, Any], column: str) -> bool:
    value: Any = features
    for part in column.split("."):
        if isinstance(value, list) and value:
            value = value[0]
        inner = getattr(value, "feature", None)
        if inner is not None and not isinstance(value, Mapping):
            value = inner
        if isinstance(value, list) and value:
            value = value[0]
        if not isinstance(value, Mapping) or part not in value:
            return False
        value = value[part]
    return True


def _feature(features: Mapping[str, Any], column: str) -> Any:
    value: Any = features
    for part in column.split("."):
        while not isinstance(value, Mapping):
            if isinstance(value, list) and value:
                value = value[0]
            elif getattr(value, "feature", None) is not None:
                value = value.feature
            else:
                return None
        value = value.get(part)
    while value is not None and getattr(value, "feature", None) is not None:
        value = value.feature
    if isinstance(value, list) and value:
        value = value[0]
    return value


@dataclass(frozen=True)
class Columns:
    """Which columns hold what; ``None`` picks the default for the schema.

    Attributes:
        image: The image column.
        boxes: The boxes column, dotted for nested features (``objects.bbox``).
        labels: The labels column (``ClassLabel`` indices, integers or strings).
        box_format: ``"xyxy"`` or ``"xywh"``; default ``xywh`` for a ``bbox`` column
            (the COCO convention), else ``xyxy``.
        normalized: Whether boxes are in 0-1 of the image size rather than pixels.
        question: The question column (query).
        answers: The answer column (query): one answer or a list of accepted ones.
    """

    image: str | None = None
    boxes: str | None = None
    labels: str | None = None
    box_format: BoxFormat | None = None
    normalized: bool = False
    question: str | None = None
    answers: str | None = None

    def resolved_for_boxes(self, dataset: datasets.Dataset, where: str) -> Columns:
        """These columns with the image, boxes, labels and box format filled in.

        Raises:
            DatasetError: If a column is missing or cannot be guessed.
        """
        features = dataset.features
        boxes = self.boxes or next((c for c in _BOX_COLUMNS if _has_column(features, c)), None)
        if boxes is None or not _has_column(features, boxes):
            raise DatasetError(
                f"{where}: no boxes column {'found' if self.boxes is None else repr(boxes)} "
                f"(tried {', '.join(_BOX_COLUMNS)}); name it with columns={{'boxes': ...}}"
            )
        labels = self.labels
        if labels is None:
            prefix = boxes.rpartition(".")[0]
            candidates = [c for c in _LABEL_COLUMNS if c.rpartition(".")[0] == prefix]
            labels = next((c for c in candidates if _has_column(features, c)), None)
        elif not _has_column(features, labels):
            raise DatasetError(f"{where}: no labels column {labels!r}")
        box_format = self.box_format or ("xywh" if boxes.endswith("bbox") else "xyxy")
        if box_format not in ("xyxy", "xywh"):
            raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}")
        return replace(
            self,
            image=image_column(dataset, self.image, where),
            boxes=boxes,
            labels=labels,
            box_format=box_format,
        )


def _as_columns(columns: Columns | Mapping[str, Any] | None) -> Columns:
    if isinstance(columns, Columns):
        return columns
    try:
        return Columns(**dict(columns or {}))
    except TypeError as exc:
        raise ValueError(
            f"columns: {exc}; keys are image, boxes, labels, box_format, normalized, "
            "question, answers"
        ) from exc


def _label_names(
    dataset: datasets.Dataset, column: str | None, class_names: Sequence[str] | None
) -> list[str] | None:
    if class_names is not None:
        return [str(name) for name in class_names]
    if column is None:
        return None
    feature = _feature(dataset.features, column)
    names = getattr(feature, "names", None)
    return list(names) if names else None


def _xyxy(values: Sequence[float], box_format: BoxFormat) -> list[float]:
    x, y, third, fourth = (float(value) for value in values)
    return [x, y, x + third, y + fourth] if box_format == "xywh" else [x, y, third, fourth]


def read_huggingface(
    source: str | Path,
    split: str | None = None,
    *,
    columns: Columns | Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    strict: bool = False,
) -> tuple[list[AnnotatedImage], list[str]]:
    """Read a detection dataset's rows into annotated images and their class list.

    Args:
        source: A saved folder, parquet/arrow data, or a cached hub name.
        split: The split (see :func:`open_dataset`).
        columns: Column mapping (:class:`Columns` or a mapping of its fields).
        class_names: Class names by label index, where labels are plain integers.
        strict: Refuse boxes outside the image or without area instead of clamping.

    Raises:
        DatasetError: Naming the source, row and box, for anything that cannot be read.
    """
    where = str(source)
    dataset = open_dataset(source, split)
    mapping = _as_columns(columns).resolved_for_boxes(dataset, where)
    assert mapping.image is not None and mapping.boxes is not None and mapping.box_format
    names = _label_names(dataset, mapping.labels, class_names)
    reader = _BoxRows(
        undecoded(dataset, mapping.image),
        mapping.image,
        mapping.boxes,
        mapping.labels,
        mapping.box_format,
        mapping.normalized,
        names,
        strict,
    )
    images: list[AnnotatedImage] = []
    classes: dict[str, None] = dict.fromkeys(names or ())
    for index, row in enumerate(reader.rows):
        image = reader.read(index, row, f"{where} row {index}")
        classes.update(dict.fromkeys(image.labels))
        images.append(image)
    return images, list(classes)


@dataclass(frozen=True)
class _BoxRows:
    """The rows of a detection dataset, and how to read each into an annotated image."""

    rows: datasets.Dataset
    image: str
    boxes: str
    labels: str | None
    box_format: BoxFormat
    normalized: bool
    names: list[str] | None
    strict: bool

    def read(self, index: int, row: Mapping[str, Any], place: str) -> AnnotatedImage:
        """One row's image, and its boxes with their labels."""
        image = image_value(row[self.image], place)
        size = None
        if not self.normalized:
            try:
                size = displayed_size(image)
            except ImageError as exc:
                raise DatasetError(f"{place}: {exc}") from exc
        boxes: list[Box] = []
        labels: list[str] = []
        for position, (values, label) in enumerate(self._pairs(row, place)):
            box_where = f"{place} box {position}"
            if values is None or len(values) != 4:
                raise DatasetError(f"{box_where}: expected 4 numbers, got {values!r}")
            name = _label_name(label, self.names, box_where)
            xyxy = _xyxy(values, self.box_format)
            box = (
                check_normalized_box(xyxy, where=box_where, strict=self.strict)
                if size is None
                else normalize_box(xyxy, size, where=box_where, strict=self.strict)
            )
            if box is not None:
                boxes.append(box)
                labels.append(name)
        image_ref = RowImage(self.rows, index, self.image)
        return AnnotatedImage(image_ref, tuple(boxes), tuple(labels), place, size)

    def _pairs(self, row: Mapping[str, Any], place: str) -> list[tuple[Any, Any]]:
        """A row's boxes, each with its label (``None`` without a labels column)."""
        raw_boxes = cell(row, self.boxes, place) or []
        raw_labels = (
            [None] * len(raw_boxes) if self.labels is None else cell(row, self.labels, place) or []
        )
        if len(raw_labels) != len(raw_boxes):
            raise DatasetError(
                f"{place}: {len(raw_boxes)} boxes but {len(raw_labels)} labels "
                f"({self.boxes} / {self.labels})"
            )
        return list(zip(raw_boxes, raw_labels, strict=True))


def _label_name(label: Any, names: Sequence[str] | None, where: str) -> str:
    if label is None:
        return "object"
    if isinstance(label, str):
        return label
    if names is None:
        raise DatasetError(
            f"{where}: label {label!r} is a number without class names; pass class_names=[...]"
        )
    try:
        return names[int(label)]
    except (IndexError, ValueError, TypeError) as exc:
        raise DatasetError(f"{where}: label {label!r} has no class name") from exc


def has_questions(
    source: str | Path,
    split: str | None = None,
    *,
    columns: Columns | Mapping[str, Any] | None = None,
    fixed_question: str | None = None,
    **_: Any,
) -> bool:
    """Whether a dataset's rows are questions (a question column, or one fixed question)."""
    mapping = _as_columns(columns)
    if mapping.question is not None or fixed_question is not None:
        return True
    names = open_dataset(source, split).column_names
    return any(column in names for column in _QUESTION_COLUMNS)


class RowQuestions(Dataset):
    """One query sample per row: the question column, answered by the answers column.

    Args:
        source: A saved folder, parquet/arrow data, or a cached hub name.
        split: The split (see :func:`open_dataset`).
        columns: Column mapping; defaults: ``image``, ``question``, ``answers``/``answer``.
        prefix: Text put before every question (a benchmark's prompt).
        fixed_question: One question asked of every row instead of a question column:
            images labelled with a class, the class being the answer (classification,
            as in Moondream's quickstart).
    """

    def __init__(
        self,
        source: str | Path,
        split: str | None = None,
        *,
        columns: Columns | Mapping[str, Any] | None = None,
        prefix: str = "",
        fixed_question: str | None = None,
    ) -> None:
        where = str(source)
        dataset = open_dataset(source, split)
        mapping = _as_columns(columns)
        names = list(dataset.column_names)
        question = mapping.question or next((c for c in _QUESTION_COLUMNS if c in names), None)
        answers = mapping.answers or next((c for c in _ANSWER_COLUMNS if c in names), None)
        roles = [("answers", answers)] + ([] if fixed_question else [("question", question)])
        for role, column in roles:
            if column is None or column not in names:
                raise DatasetError(
                    f"{where}: no {role} column {'found' if column is None else repr(column)}; "
                    f"columns: {', '.join(names)}; name it with columns={{'{role}': ...}}"
                )
        assert answers is not None
        self.fixed_question = fixed_question
        self.where = where
        self.image = image_column(dataset, mapping.image, where)
        self.rows = undecoded(dataset, self.image)
        self.question = question
        self.answers = answers
        self.prefix = prefix

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> QuerySample:
        row = self.rows[index]
        place = f"{self.where} row {index}"
        answers = row[self.answers]
        accepted = [answers] if not isinstance(answers, list) else answers
        return QuerySample(
            image=image_value(row[self.image], place),
            question=self.prefix + (self.fixed_question or str(row[self.question])),
            answers=tuple(str(answer) for answer in accepted),
            id=place,
        )
