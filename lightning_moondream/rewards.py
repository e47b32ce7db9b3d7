"""Reward functions: one set of definitions for the client, the metrics and the local service.

The server's own ground-truth formulas are not published; these are ours, and the local
service, the client-side reward functions and the evaluation metrics all use them:

- detect: one-to-one matching of predicted to true boxes maximizing IoU; reward is the
  sum of matched IoU over ``max(n_pred, n_true)``; both empty is 1.0, one empty is 0.0.
- point with true points: one-to-one matching minimizing distance; a pair scores
  ``max(0, 1 - d / 0.1)`` in normalized units; reward is the sum over
  ``max(n_pred, n_true)``.
- point with true boxes: maximum one-to-one matching of points to boxes that contain
  them; reward is the matches over ``max(n_pred, n_true)``.
- query: normalized exact match against any accepted answer, token F1, and contains.

Coordinates are plain arrays here (``(N, 4)`` boxes ``x_min, y_min, x_max, y_max`` and
``(N, 2)`` points); ``as_boxes``/``as_points`` turn the API's JSON or models into them.
Only NumPy and SciPy are needed, so the local service can import this without Lightning.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

POINT_DISTANCE_SCALE = 0.1
"""Distance, in normalized units, at which a predicted point stops earning reward."""

BoxesLike = Any
"""Boxes as an ``(N, 4)`` array, a list of ``Box`` models or of the spec's box dicts."""
PointsLike = Any
"""Points as an ``(N, 2)`` array, a list of ``Point`` models or of the spec's point dicts."""


def _coordinates(items: Any, keys: tuple[str, ...]) -> np.ndarray:
    if isinstance(items, np.ndarray):
        array = items.astype(np.float64, copy=False)
    else:
        rows = []
        for item in items or ():
            if isinstance(item, Mapping):
                rows.append([float(item[key]) for key in keys])
            elif hasattr(item, keys[0]):
                rows.append([float(getattr(item, key)) for key in keys])
            else:
                rows.append([float(value) for value in item])
        array = np.asarray(rows, dtype=np.float64)
    return array.reshape(-1, len(keys))


def as_boxes(boxes: BoxesLike) -> np.ndarray:
    """Return boxes as a float ``(N, 4)`` array of ``x_min, y_min, x_max, y_max``."""
    return _coordinates(boxes, ("x_min", "y_min", "x_max", "y_max"))


def as_points(points: PointsLike) -> np.ndarray:
    """Return points as a float ``(N, 2)`` array of ``x, y``."""
    return _coordinates(points, ("x", "y"))


def box_iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Pairwise IoU of two sets of ``xyxy`` boxes, shape ``(len(first), len(second))``."""
    top_left = np.maximum(first[:, None, :2], second[None, :, :2])
    bottom_right = np.minimum(first[:, None, 2:], second[None, :, 2:])
    intersection = np.prod(np.clip(bottom_right - top_left, 0.0, None), axis=2)
    area_first = np.prod(first[:, 2:] - first[:, :2], axis=1)
    area_second = np.prod(second[:, 2:] - second[:, :2], axis=1)
    union = area_first[:, None] + area_second[None, :] - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def match_boxes(
    predicted: BoxesLike, target: BoxesLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match predicted to true boxes one-to-one, maximizing total IoU.

    Returns:
        ``(pred_index, target_index, iou)`` of the matched pairs (pairs with zero IoU
        included, as the assignment is complete on the smaller side).
    """
    pred, true = as_boxes(predicted), as_boxes(target)
    if len(pred) == 0 or len(true) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    iou = box_iou(pred, true)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return rows, cols, iou[rows, cols]


def detect_reward(predicted: BoxesLike, target: BoxesLike) -> float:
    """Reward of predicted boxes against the true boxes.

    Sum of matched IoU over ``max(n_pred, n_true)``; 1.0 when both are empty, 0.0 when
    only one is.
    """
    n_pred, n_true = len(as_boxes(predicted)), len(as_boxes(target))
    if n_pred == 0 and n_true == 0:
        return 1.0
    if n_pred == 0 or n_true == 0:
        return 0.0
    _, _, iou = match_boxes(predicted, target)
    return float(iou.sum() / max(n_pred, n_true))


def point_pair_scores(predicted: PointsLike, target: PointsLike) -> np.ndarray:
    """Score of each pair of the distance-minimizing one-to-one matching of points.

    A pair scores ``max(0, 1 - d / 0.1)`` with ``d`` the distance in normalized units.
    """
    pred, true = as_points(predicted), as_points(target)
    if len(pred) == 0 or len(true) == 0:
        return np.zeros(0)
    distance = np.linalg.norm(pred[:, None, :] - true[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(distance)
    return np.clip(1.0 - distance[rows, cols] / POINT_DISTANCE_SCALE, 0.0, None)


def containment_matches(predicted: PointsLike, boxes: BoxesLike) -> int:
    """Size of the maximum one-to-one matching of points to boxes that contain them."""
    pred, true = as_points(predicted), as_boxes(boxes)
    if len(pred) == 0 or len(true) == 0:
        return 0
    inside = (
        (pred[:, None, 0] >= true[None, :, 0])
        & (pred[:, None, 0] <= true[None, :, 2])
        & (pred[:, None, 1] >= true[None, :, 1])
        & (pred[:, None, 1] <= true[None, :, 3])
    )
    rows, cols = linear_sum_assignment(inside.astype(np.float64), maximize=True)
    return int(inside[rows, cols].sum())


def point_reward(
    predicted: PointsLike,
    *,
    points: PointsLike | None = None,
    boxes: BoxesLike | None = None,
) -> float:
    """Reward of predicted points against true points or against boxes (containment).

    Args:
        predicted: The predicted points.
        points: True points; scored by distance.
        boxes: True boxes; a point scores when it falls in a box, one point per box.

    Raises:
        ValueError: Unless exactly one of ``points`` and ``boxes`` is given.
    """
    if (points is None) == (boxes is None):
        raise ValueError("point_reward needs exactly one of points= or boxes=")
    n_pred = len(as_points(predicted))
    n_true = len(as_points(points)) if points is not None else len(as_boxes(boxes))
    if n_pred == 0 and n_true == 0:
        return 1.0
    if n_pred == 0 or n_true == 0:
        return 0.0
    if points is not None:
        return float(point_pair_scores(predicted, points).sum() / max(n_pred, n_true))
    return containment_matches(predicted, boxes) / max(n_pred, n_true)


def ground_truth_reward(
    skill: str, output: Mapping[str, Any], ground_truth: Mapping[str, Any]
) -> float:
    """Reward of one rollout output against the spec's ground truth JSON.

    Args:
        skill: ``"point"`` or ``"detect"``.
        output: The rollout's ``output`` (``{"points": ...}`` or ``{"boxes": ...}``).
        ground_truth: ``{"points": ...}`` or ``{"boxes": ...}``.

    Raises:
        ValueError: For query (no ground-truth reward) or an unknown skill.
    """
    if skill == "detect":
        return detect_reward(output.get("boxes") or [], ground_truth.get("boxes") or [])
    if skill == "point":
        if ground_truth.get("points") is not None:
            return point_reward(output.get("points") or [], points=ground_truth["points"])
        return point_reward(output.get("points") or [], boxes=ground_truth.get("boxes") or [])
    raise ValueError(f"no ground-truth reward for skill {skill!r}; give a reward function")


# Query answers -------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans(string.punctuation, " " * len(string.punctuation))
_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
}


def normalize_answer(text: str) -> str:
    """Normalize an answer for comparison.

    Lowercase, punctuation removed, articles removed, number words (zero to twenty)
    turned into digits, white space folded.
    """
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(_NUMBER_WORDS.get(word, word) for word in text.split())


def _answers(answers: str | Iterable[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def exact_match(prediction: str | None, answers: str | Iterable[str]) -> float:
    """1.0 if the normalized prediction equals any normalized accepted answer, else 0.0."""
    if prediction is None:
        return 0.0
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(answer) for answer in _answers(answers)))


def token_f1(prediction: str | None, answers: str | Iterable[str]) -> float:
    """Best token-overlap F1 between the normalized prediction and any accepted answer."""
    if prediction is None:
        return 0.0
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for answer in _answers(answers):
        expected = normalize_answer(answer).split()
        if not predicted or not expected:
            best = max(best, float(predicted == expected))
            continue
        common = sum((Counter(predicted) & Counter(expected)).values())
        if common:
            precision, recall = common / len(predicted), common / len(expected)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def contains(prediction: str | None, answers: str | Iterable[str]) -> float:
    """1.0 if any normalized accepted answer appears as whole words in the prediction."""
    if prediction is None:
        return 0.0
    padded = f" {normalize_answer(prediction)} "
    return float(
        any(
            f" {normalize_answer(answer)} " in padded
            for answer in _answers(answers)
            if answer.strip()
        )
    )


QUERY_REWARDS: dict[str, Callable[[str | None, str | Iterable[str]], float]] = {
    "exact_match": exact_match,
    "token_f1": token_f1,
    "contains": contains,
}
"""Built-in query rewards by name, as ``reward(prediction, accepted_answers)``."""


def weighted(
    components: Sequence[tuple[Callable[..., float], float]],
) -> Callable[..., float]:
    """Combine reward functions of the same signature into their weighted mean.

    Args:
        components: ``(reward_function, weight)`` pairs; weights must be positive.

    Returns:
        A reward function returning ``sum(w * f(...)) / sum(w)``.
    """
    if not components:
        raise ValueError("weighted() needs at least one (reward_function, weight) pair")
    if any(weight <= 0 for _, weight in components):
        raise ValueError("weights of a weighted reward must be positive")
    total = sum(weight for _, weight in components)

    def combined(*args: Any, **kwargs: Any) -> float:
        return sum(weight * function(*args, **kwargs) for function, weight in components) / total

    return combined
