"""Moondream's standard benchmarks as named presets.

Each :class:`Benchmark` names its Hugging Face dataset and split, how a row becomes
prompts (the prompt prefix or suffix of Moondream's own evaluation script, the columns
read), its skill and its scoring (:mod:`lightning_moondream.presets.scorers`). Prompts and
headline scores follow Moondream's scripts (``moondream/eval``) to the letter, quirks
included, so they are comparable with its published numbers; each preset's expansion
function says which rule it follows. A :class:`BenchmarkDataset` opens the data (from the
local cache, a ``save_to_disk`` folder or parquet files; never downloaded), expands rows
into prompts, optionally takes a seeded subset, and yields ordinary samples, so anything
that evaluates samples can run it.

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

from lightning_moondream.data.errors import DatasetError, MissingPackageError
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
    PairedScores,
    ReferringScores,
    YesNoScores,
    anls,
    pair_group,
    plain_match,
    relaxed_accuracy,
)
from lightning_moondream.presets.vqa import vqa_accuracy

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
POPE_SUFFIX = "\nAnswer yes or no."
YES_NO_SUFFIX = " Answer yes or no."
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
        image: The row's image column asked about (``""``: the benchmark's one image).
    """

    row: int
    prompt: str
    answers: tuple[str, ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    group: str = ""
    image: str = ""


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
        images: The image columns of a row with several images; empty for the one
            image column found in the dataset.
        whole_rows: A row's prompts are scored together, so a subset takes whole rows.
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
    images: tuple[str, ...] = ()
    whole_rows: bool = False


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
    """CountBenchQA's prompts, as its script asks and scores them.

    ``COUNT_PREFIX + question``; right when the answer, stripped and lowercased, equals
    ``str(number)`` (``"three"`` for 3 is wrong).
    """
    return [Item(index, COUNT_PREFIX + str(row["question"]), (str(row["number"]),))]


def _pope(row: Mapping[str, Any], index: int) -> list[Item]:
    r"""POPE's prompts, as its script asks and scores them.

    ``f"{question}\nAnswer yes or no."`` per question of each split; right when the
    stripped, lowercased answer equals the label, per split (``"Yes, there is"`` is
    wrong): see :class:`YesNoScores`.
    """
    return [
        Item(index, str(qa["question"]) + POPE_SUFFIX, (str(qa["answer"]),), group=group)
        for group in POPE_GROUPS
        for qa in _qa_list(row, group, index)
    ]


def _chartqa(row: Mapping[str, Any], index: int) -> list[Item]:
    """ChartQA's prompts, as its script asks and scores them.

    ``CHART_PREFIX + question``; relaxed accuracy, element by element when the answer and
    the truth are JSON lists of one length (:func:`relaxed_accuracy`); over the ``human``
    questions and over all.
    """
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
    """TextVQA's prompts, as its script asks and scores them.

    ``TEXT_PREFIX + question``; the VQA score against the human answers
    (:func:`lightning_moondream.presets.vqa.vqa_accuracy`).
    """
    answers = tuple(str(answer) for answer in row["answers"])
    return [Item(index, TEXT_PREFIX + str(row["question"]), answers)]


def _docvqa(row: Mapping[str, Any], index: int) -> list[Item]:
    """DocVQA's prompts, as its script asks and scores them.

    ``question + DOC_SUFFIX``; ANLS, the best over the accepted answers (:func:`anls`).
    """
    return [
        Item(index, str(qa["question"]) + DOC_SUFFIX, tuple(str(a) for a in qa["answers"]))
        for qa in _qa_list(row, "qa", index)
    ]


def _realworldqa(row: Mapping[str, Any], index: int) -> list[Item]:
    """RealWorldQA's prompts, as its script asks and scores them.

    The question as given, no prefix or suffix; right when the answer, stripped and
    lowercased, equals the true letter.
    """
    return [Item(index, str(row["question"]), (str(row["answer"]),))]


def _mmstar(row: Mapping[str, Any], index: int) -> list[Item]:
    """MMStar's prompts, as its script asks and scores them.

    ``question + CHOICE_SUFFIX``; right when the answer, stripped and lowercased, equals
    the true letter (``"A."`` is wrong).
    """
    return [Item(index, str(row["question"]) + CHOICE_SUFFIX, (str(row["answer"]),))]


def _tallyqa(row: Mapping[str, Any], index: int) -> list[Item]:
    """TallyQA's prompts, as its script asks and scores them.

    ``COUNT_PREFIX + question``; stripped, lowercased equality with ``str(answer)``, over
    all questions (the script's full accuracy) and over the simple ones.
    """
    return [
        Item(
            index,
            COUNT_PREFIX + str(qa["question"]),
            (str(qa["answer"]),),
            group="simple" if qa.get("is_simple") else "complex",
        )
        for qa in _qa_list(row, "qa", index)
    ]


NATURALBENCH_ANSWER_COLUMNS = {
    (0, 0): "Image_0_Question_0",
    (1, 0): "Image_1_Question_0",
    (0, 1): "Image_0_Question_1",
    (1, 1): "Image_0_Question_1",
}
"""The truth of (image, question) as Moondream's script reads it: the second image's
answer to the second question is read from ``Image_0_Question_1``, as there, since the
published numbers are scored so."""
NATURALBENCH_COLUMNS = frozenset(NATURALBENCH_ANSWER_COLUMNS.values())


def _naturalbench(row: Mapping[str, Any], index: int) -> list[Item]:
    """NaturalBench's prompts, as its script asks and scores them.

    Questions 0 and 1 asked of images 0 and 1, with ``YES_NO_SUFFIX`` when
    ``Question_Type`` is ``yes_no``; scored in groups of four by :class:`PairedScores`
    against :data:`NATURALBENCH_ANSWER_COLUMNS`.
    """
    suffix = YES_NO_SUFFIX if row["Question_Type"] == "yes_no" else ""
    return [
        Item(
            index,
            str(row[f"Question_{question}"]) + suffix,
            (str(row[NATURALBENCH_ANSWER_COLUMNS[image, question]]),),
            group=pair_group(index, image, question),
            image=f"Image_{image}",
        )
        for question in (0, 1)
        for image in (0, 1)
    ]


def _xyxy(xywh: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, width, height = (float(value) for value in xywh)
    return (x, y, x + width, y + height)


def _coco(row: Mapping[str, Any], index: int) -> list[Item]:
    """COCO's prompts, as Moondream's COCO script asks and scores them.

    One detect prompt per label present, its COCO category name; Moondream's 11-point AP
    per image and label (:class:`DetectionScores`).
    """
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
    """RefCOCO's prompts: one detect prompt per referring expression.

    Moondream publishes no script for it: scored as referring-expression benchmarks
    are, the first box against the true one at IoU >= 0.5 (:class:`ReferringScores`).
    """
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


def _plain_accuracy() -> BenchmarkMetric:
    """Accuracy: the answer, stripped and lowercased, equals the first reference."""
    return MeanScore("accuracy", _first(plain_match))


_ACCURACY = ("accuracy",)


BENCHMARKS: dict[str, Benchmark] = {
    benchmark.name: benchmark
    for benchmark in (
        Benchmark(
            "countbenchqa", "vikhyatk/CountBenchQA", "test", "query",
            "counting objects (2 to 10) in natural images",
            ("question", "number"), _countbench,
            _plain_accuracy, _ACCURACY,
        ),
        Benchmark(
            "pope", "vikhyatk/POPE", "test", "query",
            "object hallucination: yes/no questions about objects present or absent",
            POPE_GROUPS, _pope, _pope_metric,
            ("accuracy", "f1", "accuracy_<group>", "f1_<group>", "accuracy_lenient"),
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
            _plain_accuracy, _ACCURACY,
        ),
        Benchmark(
            "mmstar", "Lin-Chen/MMStar", "val", "query",
            "multiple-choice questions that need the image, over six core abilities",
            ("question", "answer"), _mmstar,
            _plain_accuracy, _ACCURACY,
        ),
        Benchmark(
            "tallyqa", "vikhyatk/tallyqa-test", "test", "query",
            "counting, simple and complex (with attributes or relations) questions",
            ("qa",), _tallyqa,
            lambda: MeanScore("accuracy", _first(plain_match), ("simple", "complex")),
            ("accuracy", "accuracy_simple", "accuracy_complex"),
        ),
        Benchmark(
            "naturalbench", "BaiqiL/NaturalBench", "train", "query",
            "two questions asked of two images whose right answers differ, in groups of four",
            ("Question_0", "Question_1", "Question_Type", *sorted(NATURALBENCH_COLUMNS)),
            _naturalbench, PairedScores,
            ("accuracy", "question_accuracy", "image_accuracy", "group_accuracy"),
            images=("Image_0", "Image_1"), whole_rows=True,
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


def _subset(items: list[Item], limit: int, seed: int, *, whole_rows: bool) -> list[Item]:
    """A seeded subset of ``limit`` items, in their order.

    With ``whole_rows`` the rows are drawn in a seeded order and all their items taken
    until ``limit``; only the last row drawn may be cut.
    """
    generator = random.Random(seed)
    if not whole_rows:
        chosen = generator.sample(range(len(items)), limit)
    else:
        by_row: dict[int, list[int]] = {}
        for position, item in enumerate(items):
            by_row.setdefault(item.row, []).append(position)
        drawn = generator.sample(sorted(by_row), len(by_row))
        chosen = [position for row in drawn for position in by_row[row]][:limit]
    return [items[position] for position in sorted(chosen)]


class BenchmarkDataset(Dataset):
    """A benchmark's prompts as samples, with each sample's group for scoring.

    Args:
        benchmark: The benchmark, or its spec (``"pope"``, ``"pope=/data/pope"``).
        source: Where to read it: a folder, file or hub name; default the benchmark's
            dataset, from the local cache.
        limit: Keep a seeded random subset of this many prompts (all if ``None``); of
            whole rows where a row's prompts are scored together.
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
        except MissingPackageError:
            # A folder needs the package too: pointing at one would not help.
            raise
        except DatasetError as exc:
            raise DatasetError(
                f"{where}: {exc}; or pass {benchmark.name}=FOLDER (a save_to_disk folder or "
                "parquet files)"
            ) from exc
        images = benchmark.images or (image_column(opened, None, where),)
        rows = opened
        for column in images:
            rows = undecoded(rows, image_column(opened, column, where))
        self.image = images[0]
        self.rows = rows
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
            items = _subset(items, limit, seed, whole_rows=benchmark.whole_rows)
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def group(self, index: int) -> str:
        """The group sample ``index`` is scored in."""
        return self.items[index].group

    def __getitem__(self, index: int) -> QuerySample | DetectSample:
        item = self.items[index]
        sample_id = f"{self.benchmark.name}/{item.row}#{index}"
        column = item.image or self.image
        image = image_value(self.rows[item.row][column], f"{sample_id} row {item.row}")
        if self.benchmark.skill == "detect":
            return DetectSample.from_pixels(image, item.prompt, item.boxes, id=sample_id)
        return QuerySample(image=image, question=item.prompt, answers=item.answers, id=sample_id)
