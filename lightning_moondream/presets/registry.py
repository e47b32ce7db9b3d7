"""Moondream's standard benchmarks as named presets.

Each :class:`Benchmark` names its Hugging Face dataset and split, how a row becomes
prompts (the prompt prefix or suffix of Moondream's own evaluation script, the columns
read), its skill and its scoring (:mod:`lightning_moondream.presets.scorers`). A
:class:`BenchmarkDataset` opens the data (from the local cache, a ``save_to_disk`` folder
or parquet files; never downloaded), expands rows into prompts, optionally takes a seeded
subset, and yields ordinary samples, so anything that evaluates samples can run it.

Name a benchmark as ``"pope"``, or ``"pope=/data/pope"`` to read it from a folder or file
instead of the cache.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from lightning_moondream.data.errors import DatasetError
from lightning_moondream.data.samples import DetectSample, QuerySample
from lightning_moondream.data.sources.huggingface import (
    image_column,
    image_value,
    open_dataset,
    undecoded,
)
from lightning_moondream.presets.scorers import (
    BenchmarkMetric,
    DetectionScores,
    MeanScore,
    ReferringScores,
    YesNoScores,
    anls,
    plain_match,
    relaxed_accuracy,
    vqa_accuracy,
)

COUNT_PREFIX = (
    "Look at the image carefully and count the objects. Answer with just a number, "
    "without any additional text. "
)
CHART_PREFIX = (
    "Analyze the chart carefully, consider both visual features and data values, and "
    "provide a precise answer without any additional explanation or formatting. "
)
TEXT_PREFIX = (
    "Read the text in the image and provide a brief lowercase answer. Respond "
    "'unanswerable' only if there is no plausible answer. "
)
DOC_SUFFIX = " The answer should be a short text span taken verbatim from the document."
POPE_SUFFIX = ". Answer yes or no."
CHOICE_SUFFIX = (
    " Please answer directly with only the letter of the correct option and nothing else."
)
POPE_GROUPS = ("adversarial", "popular", "random")

COCO_CATEGORIES = (
    "None", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter",
    "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "plate",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "mirror", "dining table", "window", "desk", "toilet", "door", "tv",
    "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "hair brush",
)  # fmt: skip
"""COCO category names by the original 91-id numbering (index 0 unused)."""


@dataclass(frozen=True)
class Item:
    """One prompt of a benchmark.

    Attributes:
        row: The dataset row holding the image.
        prompt: The question, or the object phrase for detect.
        answers: Accepted answers (query).
        boxes: True boxes in pixel ``xyxy`` (detect).
        group: The group it is scored in (``""`` for none).
    """

    row: int
    prompt: str
    answers: tuple[str, ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    group: str = ""


Expand = Callable[[Mapping[str, Any], int], list[Item]]


@dataclass(frozen=True)
class Benchmark:
    """A named benchmark.

    Attributes:
        name: Its name on the command line and in ``bench/<name>/<metric>``.
        dataset: Hugging Face dataset name.
        split: The split evaluated.
        skill: ``"query"`` or ``"detect"``.
        measures: What it measures, in a sentence.
        columns: The columns a row's prompts are read from (besides the image).
        expand: ``expand(row, index)``: the row's prompts.
        metric: Builds a fresh metric of the benchmark.
        metric_names: The headline metrics, for documentation.
    """

    name: str
    dataset: str
    split: str
    skill: Literal["query", "detect"]
    measures: str
    columns: tuple[str, ...]
    expand: Expand
    metric: Callable[[], BenchmarkMetric]
    metric_names: tuple[str, ...]


def _first(function: Callable[[str | None, str], float]) -> Callable[..., float]:
    def score(prediction: str | None, answers: Sequence[str]) -> float:
        return function(prediction, answers[0]) if answers else 0.0

    score.__name__ = function.__name__
    return score


def _qa_list(row: Mapping[str, Any], column: str, index: int) -> list[Mapping[str, Any]]:
    value = row.get(column)
    if not isinstance(value, list):
        raise DatasetError(f"row {index}: column {column!r} should be a list of questions")
    return value


def _countbench(row: Mapping[str, Any], index: int) -> list[Item]:
    return [Item(index, COUNT_PREFIX + str(row["question"]), (str(row["number"]),))]


def _pope(row: Mapping[str, Any], index: int) -> list[Item]:
    return [
        Item(index, str(qa["question"]) + POPE_SUFFIX, (str(qa["answer"]),), group=group)
        for group in POPE_GROUPS
        for qa in _qa_list(row, group, index)
    ]


def _chartqa(row: Mapping[str, Any], index: int) -> list[Item]:
    return [
        Item(
            index,
            CHART_PREFIX + str(qa["question"]),
            (str(qa["answer"]),),
            group="human" if qa.get("source") == "human" else "augmented",
        )
        for qa in _qa_list(row, "qa", index)
    ]


def _textvqa(row: Mapping[str, Any], index: int) -> list[Item]:
    answers = tuple(str(answer) for answer in row["answers"])
    return [Item(index, TEXT_PREFIX + str(row["question"]), answers)]


def _docvqa(row: Mapping[str, Any], index: int) -> list[Item]:
    return [
        Item(index, str(qa["question"]) + DOC_SUFFIX, tuple(str(a) for a in qa["answers"]))
        for qa in _qa_list(row, "qa", index)
    ]


def _realworldqa(row: Mapping[str, Any], index: int) -> list[Item]:
    return [Item(index, str(row["question"]), (str(row["answer"]),))]


def _mmstar(row: Mapping[str, Any], index: int) -> list[Item]:
    return [Item(index, str(row["question"]) + CHOICE_SUFFIX, (str(row["answer"]),))]


def _tallyqa(row: Mapping[str, Any], index: int) -> list[Item]:
    return [
        Item(
            index,
            COUNT_PREFIX + str(qa["question"]),
            (str(qa["answer"]),),
            group="simple" if qa.get("is_simple") else "complex",
        )
        for qa in _qa_list(row, "qa", index)
    ]


def _xyxy(xywh: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, width, height = (float(value) for value in xywh)
    return (x, y, x + width, y + height)


def _coco(row: Mapping[str, Any], index: int) -> list[Item]:
    objects = row["objects"]
    if isinstance(objects, str):
        objects = json.loads(objects)
    by_label: dict[str, list[tuple[float, float, float, float]]] = {}
    for xywh, label in zip(objects["bbox"], objects["label"], strict=True):
        name = COCO_CATEGORIES[label] if isinstance(label, int) else str(label)
        by_label.setdefault(name, []).append(_xyxy(xywh))
    return [Item(index, name, boxes=tuple(boxes)) for name, boxes in sorted(by_label.items())]


_EXPRESSION_COLUMNS = ("expression", "sentence", "sentences", "answer", "question")


def _refcoco(row: Mapping[str, Any], index: int) -> list[Item]:
    column = next((name for name in _EXPRESSION_COLUMNS if row.get(name)), None)
    if column is None:
        raise DatasetError(
            f"row {index}: no referring expression ({', '.join(_EXPRESSION_COLUMNS)})"
        )
    expressions = row[column] if isinstance(row[column], list) else [row[column]]
    box = _xyxy(row["bbox"])
    return [Item(index, str(text), boxes=(box,)) for text in expressions]


def _pope_metric() -> BenchmarkMetric:
    return YesNoScores(POPE_GROUPS)


BENCHMARKS: dict[str, Benchmark] = {
    benchmark.name: benchmark
    for benchmark in (
        Benchmark(
            "countbenchqa", "vikhyatk/CountBenchQA", "test", "query",
            "counting objects (2 to 10) in natural images",
            ("question", "number"), _countbench,
            lambda: MeanScore("accuracy", _first(plain_match)), ("accuracy",),
        ),
        Benchmark(
            "pope", "vikhyatk/POPE", "test", "query",
            "object hallucination: yes/no questions about objects present or absent",
            POPE_GROUPS, _pope, _pope_metric,
            ("accuracy", "f1", "accuracy_<group>", "f1_<group>"),
        ),
        Benchmark(
            "chartqa", "vikhyatk/chartqa", "test", "query",
            "reading values off charts and reasoning over them",
            ("qa",), _chartqa,
            lambda: MeanScore("accuracy", _first(relaxed_accuracy), ("human", "augmented")),
            ("accuracy", "accuracy_human", "accuracy_augmented"),
        ),
        Benchmark(
            "textvqa", "vikhyatk/textvqa_val", "validation", "query",
            "reading text in natural images",
            ("question", "answers"), _textvqa,
            lambda: MeanScore("vqa_accuracy", vqa_accuracy), ("vqa_accuracy",),
        ),
        Benchmark(
            "docvqa", "vikhyatk/docvqa-val", "validation", "query",
            "answering questions about scanned documents",
            ("qa",), _docvqa, lambda: MeanScore("anls", anls), ("anls",),
        ),
        Benchmark(
            "realworldqa", "lmms-lab/RealWorldQA", "test", "query",
            "multiple-choice spatial questions about real-world scenes",
            ("question", "answer"), _realworldqa,
            lambda: MeanScore("accuracy", _first(plain_match)), ("accuracy",),
        ),
        Benchmark(
            "mmstar", "Lin-Chen/MMStar", "val", "query",
            "multiple-choice questions that need the image, over six core abilities",
            ("question", "answer"), _mmstar,
            lambda: MeanScore("accuracy", _first(plain_match)), ("accuracy",),
        ),
        Benchmark(
            "tallyqa", "vikhyatk/tallyqa-test", "test", "query",
            "counting, simple and complex (with attributes or relations) questions",
            ("qa",), _tallyqa,
            lambda: MeanScore("accuracy", _first(plain_match), ("simple", "complex")),
            ("accuracy", "accuracy_simple", "accuracy_complex"),
        ),
        Benchmark(
            "coco", "moondream/coco-val-2017-bbox-cleaned", "validation", "detect",
            "object detection on COCO val2017, one prompt per image and label present",
            ("objects",), _coco, DetectionScores, ("moondream_map", "map", "map_50", "map_75"),
        ),
        Benchmark(
            "refcoco", "lmms-lab/RefCOCO", "val", "detect",
            "referring expressions: the box of the one object a phrase describes",
            ("bbox", *_EXPRESSION_COLUMNS), _refcoco, ReferringScores, ("accuracy", "miou"),
        ),
    )
}  # fmt: skip
"""Every benchmark by name."""

ALL = "all"


def parse_benchmark(spec: str) -> tuple[Benchmark, str | None]:
    """Parse ``NAME`` or ``NAME=SOURCE`` into the benchmark and its source override.

    Raises:
        ValueError: If the name is unknown.
    """
    name, _, source = spec.partition("=")
    benchmark = BENCHMARKS.get(name.strip().lower())
    if benchmark is None:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} (or {ALL!r})")
    return benchmark, source.strip() or None


def expand_names(specs: Sequence[str]) -> list[str]:
    """``specs`` with ``"all"`` replaced by every benchmark name, duplicates dropped."""
    names: list[str] = []
    for spec in specs:
        for name in BENCHMARKS if spec.strip().lower() == ALL else [spec]:
            if name not in names:
                names.append(name)
    return names


class BenchmarkDataset(Dataset):
    """A benchmark's prompts as samples, with each sample's group for scoring.

    Args:
        benchmark: The benchmark, or its spec (``"pope"``, ``"pope=/data/pope"``).
        source: Where to read it: a folder, file or hub name; default the benchmark's
            dataset, from the local cache.
        limit: Keep a seeded random subset of this many prompts (all if ``None``).
        seed: Seed of the subset.

    Raises:
        DatasetError: If the dataset is not on this machine or a row cannot be read; the
            message names the benchmark and where to place the dataset.
    """

    def __init__(
        self,
        benchmark: Benchmark | str,
        source: str | Path | None = None,
        *,
        limit: int | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(benchmark, str):
            benchmark, override = parse_benchmark(benchmark)
            source = source or override
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.benchmark = benchmark
        where = f"benchmark {benchmark.name}"
        try:
            opened = open_dataset(source or benchmark.dataset, benchmark.split)
        except DatasetError as exc:
            raise DatasetError(
                f"{where}: {exc}; or pass {benchmark.name}=FOLDER (a save_to_disk folder or "
                "parquet files)"
            ) from exc
        self.image = image_column(opened, None, where)
        self.rows = undecoded(opened, self.image)
        present = [name for name in benchmark.columns if name in self.rows.column_names]
        items: list[Item] = []
        for index, row in enumerate(self.rows.select_columns(present)):
            try:
                items.extend(benchmark.expand(row, index))
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetError(
                    f"{where}: row {index} of {source or benchmark.dataset} does not have the "
                    f"expected columns ({', '.join(benchmark.columns)}): {exc!r}"
                ) from exc
        if limit is not None and limit < len(items):
            chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
            items = [items[position] for position in chosen]
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def group(self, index: int) -> str:
        """The group sample ``index`` is scored in."""
        return self.items[index].group

    def __getitem__(self, index: int) -> QuerySample | DetectSample:
        item = self.items[index]
        sample_id = f"{self.benchmark.name}/{item.row}#{index}"
        image = image_value(self.rows[item.row][self.image], f"{sample_id} row {item.row}")
        if self.benchmark.skill == "detect":
            return DetectSample.from_pixels(image, item.prompt, item.boxes, id=sample_id)
        return QuerySample(image=image, question=item.prompt, answers=item.answers, id=sample_id)
