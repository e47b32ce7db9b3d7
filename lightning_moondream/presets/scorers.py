"""Scoring of Moondream's benchmarks: per-answer functions and torchmetrics ``Metric`` s.

The functions score one answer as Moondream's evaluation scripts do:

- :func:`plain_match`: stripped, lowercased equality (CountBenchQA, TallyQA, RealWorldQA,
  MMStar, NaturalBench);
- :func:`exact_yes_no`: the stripped, lowercased answer is exactly ``yes`` or ``no``
  (POPE); :func:`yes_no` reads the first word instead, for a lenient extra;
- :func:`relaxed_accuracy`: within 5% for numbers (``"12%"`` is 0.12), exact otherwise;
  JSON lists of the same length element-wise (ChartQA);
- :func:`lightning_moondream.presets.vqa.vqa_accuracy`: the VQA score (TextVQA);
- :func:`anls`: 1 - normalized Levenshtein distance, 0 below 0.5, best over the
  accepted answers (DocVQA);
- :func:`eleven_point_ap`: the AP of one image and label with every box at confidence 1.0
  and greedy matching at IoU 0.5 (Moondream's COCO protocol).

The metrics keep summed states (per group, in a fixed group order), so they are exact
when synchronized across processes; :class:`PairedScores`, whose groups of four may be
answered in different processes, keeps each answer and joins them after synchronizing.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_moondream.metrics import DetectionMAP
from lightning_moondream.rewards import BoxesLike, as_boxes, box_iou, normalize_answer

RELAXED_TOLERANCE = 0.05
ANLS_THRESHOLD = 0.5
AP_IOU_THRESHOLD = 0.5
YES_NO = ("yes", "no")
RECALL_LEVELS = np.arange(0, 1.1, 0.1)
"""The 11 recall levels of the AP, as floats: 0.3, 0.6 and 0.7 land a little above."""


# Per-answer functions ------------------------------------------------------------------


def plain_match(prediction: str | None, answer: str) -> float:
    """1.0 if the prediction, stripped and lowercased, equals the answer, else 0.0."""
    if prediction is None:
        return 0.0
    return float(prediction.strip().lower() == answer.strip().lower())


def exact_yes_no(prediction: str | None) -> str | None:
    """``"yes"`` or ``"no"`` if the answer, stripped and lowercased, is exactly one."""
    text = (prediction or "").strip().lower()
    return text if text in YES_NO else None


def yes_no(prediction: str | None) -> str | None:
    """``"yes"`` or ``"no"`` if the answer's first word is one, else ``None`` (lenient)."""
    words = normalize_answer(prediction or "").split()
    return words[0] if words and words[0] in YES_NO else None


def _number(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    """Whether one answer is correct: within ``tolerance`` of a non-zero number, else equal."""
    prediction, target = prediction.strip().lower(), target.strip().lower()
    predicted, expected = _number(prediction), _number(target)
    if predicted is not None and expected:
        return abs(predicted - expected) / abs(expected) <= tolerance
    return prediction == target


def _as_list(text: str) -> list[Any] | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, list) else None


def relaxed_accuracy(prediction: str | None, answer: str) -> float:
    """ChartQA's relaxed accuracy of one answer.

    When both are JSON lists of the same length, every element must match; otherwise
    the two texts are compared as single answers.
    """
    if prediction is None:
        return 0.0
    predicted, expected = _as_list(prediction), _as_list(answer)
    if predicted is None or expected is None or len(predicted) != len(expected):
        predicted, expected = [prediction], [answer]
    return float(
        all(relaxed_match(str(p), str(e)) for p, e in zip(predicted, expected, strict=True))
    )


def levenshtein(first: str, second: str) -> int:
    """Edit distance (insertions, deletions and substitutions of one character)."""
    if len(first) < len(second):
        first, second = second, first
    previous = list(range(len(second) + 1))
    for row, char in enumerate(first, start=1):
        current = [row]
        for column, other in enumerate(second, start=1):
            current.append(
                min(previous[column] + 1, current[-1] + 1, previous[column - 1] + (char != other))
            )
        previous = current
    return previous[-1]


def anls(
    prediction: str | None, answers: Sequence[str], threshold: float = ANLS_THRESHOLD
) -> float:
    """Average normalized Levenshtein similarity of one answer: its best over ``answers``.

    Similarity is ``1 - distance / max(len)`` of the stripped, lowercased texts, and 0.0
    when below ``threshold``.
    """
    text = (prediction or "").strip().lower()
    best = 0.0
    for answer in answers:
        expected = answer.strip().lower()
        longest = max(len(text), len(expected))
        similarity = 1.0 if longest == 0 else 1.0 - levenshtein(text, expected) / longest
        best = max(best, similarity if similarity >= threshold else 0.0)
    return best


def eleven_point_ap(
    predicted: BoxesLike, target: BoxesLike, iou_threshold: float = AP_IOU_THRESHOLD
) -> float:
    """AP of one image and label as Moondream's COCO script computes it.

    Every predicted box has confidence 1.0 and keeps its order; each is matched greedily
    to the unmatched true box of highest IoU, a hit at ``iou_threshold`` or above. AP is
    the 11-point interpolated average over :data:`RECALL_LEVELS`, the levels as the script
    makes them: a recall of exactly 0.3, 0.6 or 0.7 (3 of 10 boxes) falls short of the level
    ``0.30000000000000004`` etc., and published numbers carry this. 0.0 without true boxes.
    """
    pred, true = as_boxes(predicted), as_boxes(target)
    if len(true) == 0:
        return 0.0
    ious = box_iou(pred, true) if len(pred) else np.zeros((0, len(true)))
    matched = np.zeros(len(true), dtype=bool)
    hits = np.zeros(len(pred))
    for index, row in enumerate(ious):
        candidates = np.where(matched, -1.0, row)
        best = int(np.argmax(candidates)) if len(candidates) else -1
        if best >= 0 and candidates[best] >= iou_threshold:
            hits[index] = 1.0
            matched[best] = True
    true_positives = np.cumsum(hits)
    recalls = true_positives / len(true)
    precisions = true_positives / np.arange(1, len(pred) + 1)
    total = 0.0
    for level in RECALL_LEVELS:
        reached = precisions[recalls >= level]
        total += float(reached.max()) if len(reached) else 0.0
    return total / len(RECALL_LEVELS)


# Metrics ----------------------------------------------------------------------------------


class Observation(NamedTuple):
    """One scored answer: the rollout's output, the sample's target and its context."""

    output: Mapping[str, Any]
    target: Mapping[str, Any]
    group: str
    label: str
    image_size: tuple[int, int] | None


class BenchmarkMetric(Metric):
    """A benchmark's scores: ``update`` one answer with its target and group, ``compute`` all.

    Args:
        groups: The benchmark's groups (POPE's adversarial/popular/random, ...), in a
            fixed order so per-group states line up across processes.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, groups: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.groups = tuple(groups)

    def _group_index(self, group: str) -> int | None:
        if not group:
            return None
        try:
            return self.groups.index(group)
        except ValueError:
            raise ValueError(f"unknown group {group!r}; expected one of {self.groups}") from None

    def update(
        self,
        output: Mapping[str, Any],
        target: Mapping[str, Any],
        group: str = "",
        label: str = "",
        image_size: tuple[int, int] | None = None,
    ) -> None:
        """Add one rollout ``output`` against the sample's ``target``.

        Args:
            output: The rollout's output (``answer`` or ``boxes``).
            target: The sample's target (``answers`` or ``boxes``).
            group: The sample's group, ``""`` for none.
            label: The prompt (the class of detect boxes).
            image_size: ``(width, height)`` of the image, for detect.
        """
        self._add(Observation(output, target, group, label, image_size))

    @abstractmethod
    def _add(self, observed: Observation) -> None:
        """Accumulate one observation into the states."""


class MeanScore(BenchmarkMetric):
    """Mean of a per-answer score, overall and per group.

    Args:
        name: Key of the overall mean, e.g. ``"accuracy"``; groups add ``name_group``.
        score: ``score(answer, accepted answers) -> float``.
        groups: The groups.
        **kwargs: Passed to ``torchmetrics.Metric``.

    Example:
        >>> metric = MeanScore("accuracy", lambda answer, answers: float(answer == answers[0]))
        >>> metric.update({"answer": "3"}, {"answers": ["3"]})
        >>> float(metric.compute()["accuracy"])
        1.0
    """

    sums: Tensor
    counts: Tensor

    def __init__(self, name: str, score: Any, groups: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(groups, **kwargs)
        self.name = name
        self.score = score
        size = len(self.groups) + 1
        self.add_state("sums", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, observed: Observation) -> None:
        """Score ``output["answer"]`` against ``target["answers"]``."""
        answers = list(observed.target.get("answers") or ())
        value = self.score(observed.output.get("answer"), answers)
        index = self._group_index(observed.group)
        positions = [0] if index is None else [0, index + 1]
        for position in positions:
            self.sums[position] += value
            self.counts[position] += 1

    def compute(self) -> dict[str, Tensor]:
        """The overall mean under ``name`` and each group's under ``name_group``."""
        means = torch.where(self.counts > 0, self.sums / self.counts.clamp(min=1), 0.0)
        result = {self.name: means[0]}
        for position, group in enumerate(self.groups, start=1):
            if self.counts[position] > 0:
                result[f"{self.name}_{group}"] = means[position]
        return result


class YesNoScores(BenchmarkMetric):
    """Yes/no accuracy and F1 (``yes`` the positive class), overall and per group (POPE).

    As Moondream's POPE script: an answer is right when, stripped and lowercased, it
    equals the lowercased label (:func:`exact_yes_no`); ``"Yes, there is"`` and ``"No."``
    are wrong. Anything but exactly ``yes`` or ``no`` counts as wrong for F1 too: a false
    negative when the truth is yes, a false positive when it is no. ``accuracy_lenient``
    reads the answer's first word instead (:func:`yes_no`); it is not comparable with
    published numbers.
    """

    counts: Tensor
    lenient: Tensor

    def __init__(self, groups: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(groups, **kwargs)
        rows = len(self.groups) + 1
        # Per row (overall, then each group): true/false positives, false/true negatives.
        self.add_state("counts", torch.zeros(rows, 4, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("lenient", torch.zeros(rows, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, observed: Observation) -> None:
        """Read ``output["answer"]`` against ``target["answers"][0]`` (yes or no)."""
        answers = observed.target.get("answers") or [""]
        truth = answers[0].lower()
        if truth not in YES_NO:
            raise ValueError(f"a yes/no target needs 'yes' or 'no', got {answers}")
        answer = observed.output.get("answer")
        hit = exact_yes_no(answer) == truth
        # Columns: true positive, false positive, false negative, true negative.
        cell = (0 if hit else 2) if truth == "yes" else (3 if hit else 1)
        index = self._group_index(observed.group)
        for row in [0] if index is None else [0, index + 1]:
            self.counts[row, cell] += 1
            self.lenient[row] += float(yes_no(answer) == truth)

    def compute(self) -> dict[str, Tensor]:
        """``accuracy``, ``f1``, ``precision``, ``recall``, ``accuracy_lenient``, per group too.

        Per group: ``accuracy_<group>``, ``f1_<group>``, ``accuracy_lenient_<group>``.
        """
        result: dict[str, Tensor] = {}
        for row, suffix in enumerate(("", *(f"_{group}" for group in self.groups))):
            tp, fp, fn, tn = self.counts[row]
            total = tp + fp + fn + tn
            if row and total == 0:
                continue
            precision = tp / (tp + fp) if tp + fp > 0 else torch.tensor(0.0, dtype=torch.float64)
            recall = tp / (tp + fn) if tp + fn > 0 else torch.tensor(0.0, dtype=torch.float64)
            both = precision + recall
            result[f"accuracy{suffix}"] = (tp + tn) / total if total > 0 else total
            result[f"f1{suffix}"] = 2 * precision * recall / both if both > 0 else both
            if not row:
                result["precision"], result["recall"] = precision, recall
            lenient = self.lenient[row]
            result[f"accuracy_lenient{suffix}"] = lenient / total if total > 0 else lenient
        return result


class DetectionScores(BenchmarkMetric):
    """Moondream's COCO score and COCO mAP (torchmetrics) of detect outputs.

    ``moondream_map`` is the mean, over every (image, label present) prompt, of
    :func:`eleven_point_ap`: Moondream's protocol, averaged by label frequency, comparable
    with its published number. ``map``, ``map_50``, ``map_75`` pool all detections of a
    class over images, as COCO does (see :class:`lightning_moondream.metrics.DetectionMAP`).
    Prompts whose true boxes are empty do not count in ``moondream_map``, as in Moondream's
    script, which asks only about labels present.
    """

    ap_sum: Tensor
    prompts: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__((), **kwargs)
        self.add_state("ap_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompts", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.coco = DetectionMAP()

    def _add(self, observed: Observation) -> None:
        """Score ``output["boxes"]`` against ``target["boxes"]`` of one prompt."""
        predicted = observed.output.get("boxes") or []
        boxes = observed.target.get("boxes") or []
        if boxes:
            self.ap_sum += eleven_point_ap(predicted, boxes)
            self.prompts += 1
        self.coco.update(predicted, boxes, label=observed.label, image_size=observed.image_size)

    def compute(self) -> dict[str, Tensor]:
        """``moondream_map``, then COCO's ``map``, ``map_50`` and ``map_75``."""
        moondream = self.ap_sum / self.prompts if self.prompts > 0 else self.prompts
        return {"moondream_map": moondream, **self.coco.compute()}

    def reset(self) -> None:
        """Reset this metric and the COCO one it holds."""
        super().reset()
        self.coco.reset()


class ReferringScores(BenchmarkMetric):
    """Referring-expression boxes: the first predicted box against the one true box.

    ``accuracy`` is the share of prompts whose first box has IoU >= 0.5 with the truth
    (no box is a miss); ``miou`` their mean IoU.
    """

    sums: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__((), **kwargs)
        # Hits, IoU sum, prompts.
        self.add_state("sums", torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, observed: Observation) -> None:
        """Score the first of ``output["boxes"]`` against the first true box."""
        predicted = as_boxes(observed.output.get("boxes") or [])[:1]
        true = as_boxes(observed.target.get("boxes") or [])[:1]
        iou = float(box_iou(predicted, true)[0, 0]) if len(predicted) and len(true) else 0.0
        self.sums += torch.tensor([float(iou >= AP_IOU_THRESHOLD), iou, 1.0], dtype=torch.float64)

    def compute(self) -> dict[str, Tensor]:
        """``accuracy`` (IoU >= 0.5) and ``miou``."""
        hits, iou_sum, prompts = self.sums
        if prompts == 0:
            return {"accuracy": prompts, "miou": prompts.clone()}
        return {"accuracy": hits / prompts, "miou": iou_sum / prompts}


def pair_group(row: int, image: int, question: int) -> str:
    """The group of a prompt scored in its row's group of four: ``"ROW/IMAGE/QUESTION"``."""
    return f"{row}/{image}/{question}"


def _pair_place(group: str) -> tuple[int, int, int]:
    try:
        row, image, question = (int(part) for part in group.split("/"))
    except ValueError:
        raise ValueError(f"group {group!r} is not 'ROW/IMAGE/QUESTION'") from None
    if image not in (0, 1) or question not in (0, 1):
        raise ValueError(f"group {group!r}: image and question are 0 or 1")
    return row, image, question


PAIRED_UNITS = {
    "question_accuracy": ((0, 1), (2, 3)),
    "image_accuracy": ((0, 2), (1, 3)),
    "group_accuracy": ((0, 1, 2, 3),),
}
"""The places (``2 * question + image``) scored together, by the metric they make."""


class PairedScores(BenchmarkMetric):
    """Accuracies of two questions asked of two images, in groups of four (NaturalBench).

    Each row asks question 0 and question 1 of image 0 and image 1; an answer is right
    when, stripped and lowercased, it equals the stripped, lowercased truth
    (:func:`plain_match`). Each prompt's group is :func:`pair_group` of its row, image
    and question. As Moondream's NaturalBench script computes them:

    - ``accuracy``: the share of right answers;
    - ``question_accuracy``: the share of (row, question) pairs right on both images;
    - ``image_accuracy``: the share of (row, image) pairs right on both questions;
    - ``group_accuracy``: the share of rows right on all four.

    Pairs and rows count only when all their prompts were scored (a subset may cut a
    row); a key whose pairs or rows are all incomplete is left out. The prompts of a row
    may be scored in different processes, so each answer is kept (row, place, right)
    and the states are concatenated when synchronized, then joined per row.
    """

    answers: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__((), **kwargs)
        self.add_state("answers", [], dist_reduce_fx="cat")
        # Row numbers stay exact, and a process with no answer joins with this dtype too.
        self.set_dtype(torch.float64)

    def _add(self, observed: Observation) -> None:
        """Score ``output["answer"]`` against ``target["answers"][0]`` at its group's place."""
        row, image, question = _pair_place(observed.group)
        answers = observed.target.get("answers") or [""]
        right = plain_match(observed.output.get("answer"), answers[0])
        place = 2 * question + image
        self.answers.append(torch.tensor([row, place, right], dtype=self.dtype))

    def compute(self) -> dict[str, Tensor]:
        """``accuracy``, and ``question_accuracy``, ``image_accuracy``, ``group_accuracy``."""
        scored = dim_zero_cat(self.answers) if len(self.answers) else torch.zeros(0)
        rows: dict[int, dict[int, bool]] = {}
        for row, place, right in scored.reshape(-1, 3).tolist():
            rows.setdefault(int(row), {})[int(place)] = bool(right)
        rights = [right for places in rows.values() for right in places.values()]
        result = {"accuracy": torch.tensor(_share(rights), dtype=torch.float64)}
        for name, unit_places in PAIRED_UNITS.items():
            outcomes = [
                all(places[place] for place in unit)
                for places in rows.values()
                for unit in unit_places
                if all(place in places for place in unit)
            ]
            if outcomes:
                result[name] = torch.tensor(_share(outcomes), dtype=torch.float64)
        return result


def _share(outcomes: Sequence[bool]) -> float:
    return sum(outcomes) / len(outcomes) if outcomes else 0.0
