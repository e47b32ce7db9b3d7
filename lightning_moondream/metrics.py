"""Evaluation metrics for detect, point and query outputs, as torchmetrics ``Metric`` classes.

Each metric sits over a functional core (``detection_counts``, ``point_counts``,
``precision_recall_f1``) built on the matching of :mod:`lightning_moondream.rewards`, so
metrics, client-side rewards and the local service agree on what a hit is:

- detection precision, recall and F1 count a predicted box as a true positive when the
  one-to-one maximum-IoU matching pairs it with a true box at IoU >= 0.5; the mean matched
  IoU averages the IoU of every pair that matching forms (zero-overlap pairs included, as
  the assignment is complete on the smaller side);
- point precision, recall and F1 count a predicted point as a true positive when the
  distance-minimizing matching pairs it with a true point closer than 0.1 (its reward score
  is above zero), or, against true boxes, when the maximum containment matching places it
  in a box;
- VQA accuracy is the normalized exact match against any accepted answer;
- mAP is torchmetrics' ``MeanAveragePrecision`` in pixel ``xyxy``.

The API returns no confidence scores, so every predicted box is given the score 1.0. All
detections of an epoch then tie, and mAP measures the single operating point the model
outputs (one precision/recall pair per class and IoU threshold) rather than the area under
a ranked precision/recall curve. Compare adapters with it; do not compare it with mAP of
detectors that rank their boxes. COCO breaks the ties by image order, so images are
ordered by a checksum of their content, not by arrival: the value does not depend on
batching, shuffling or how images were split over processes.

Empty cases: an image with neither predictions nor targets adds nothing to any count.
When a whole epoch has none, precision, recall, F1 and mean IoU are 1.0 (nothing to find
and nothing found is a perfect answer, as in the rewards); when only one side is empty
they are 0.0. mAP follows COCO and reports -1 when there are no true boxes. VQA accuracy
is 0.0 before any question is seen.

Every state is summed (or, for the boxes mAP needs, concatenated), so values are exact
under distributed evaluation. Call ``update`` in the step and ``compute`` then ``reset``
at epoch end; per-batch ``forward`` is never needed.
"""

from __future__ import annotations

import importlib.util
import warnings
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision

from lightning_moondream.rewards import (
    BoxesLike,
    PointsLike,
    as_boxes,
    as_points,
    containment_matches,
    exact_match,
    match_boxes,
    point_pair_scores,
)

IOU_THRESHOLD = 0.5
"""IoU at which a matched predicted box counts as a true positive."""

SKILLS = ("detect", "point", "query")

MapBackend = Literal["faster_coco_eval", "pycocotools"]


def default_map_backend() -> MapBackend:
    """Return ``"faster_coco_eval"`` when it is installed, else ``"pycocotools"``."""
    return "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"


def label_id(label: str) -> int:
    """Stable class id of a prompt label, the same in every process and every run.

    A CRC-32 of the UTF-8 text (31 bits) rather than a running vocabulary: processes
    evaluating different shards must agree on ids without talking to each other. Two
    labels collide with probability about ``n**2 / 2**32`` for ``n`` distinct labels.
    """
    return zlib.crc32(label.encode("utf-8")) & 0x7FFFFFFF


# Functional core ------------------------------------------------------------------------


class DetectionCounts(NamedTuple):
    """Counts of one image's detections under the one-to-one maximum-IoU matching."""

    true_positives: int
    """Matched pairs with IoU >= the threshold."""
    predicted: int
    """Number of predicted boxes."""
    target: int
    """Number of true boxes."""
    iou_sum: float
    """Sum of IoU over every matched pair."""
    pairs: int
    """Number of matched pairs: ``min(predicted, target)``."""


class PointCounts(NamedTuple):
    """Counts of one image's points under the matching of the point reward."""

    true_positives: int
    """Predicted points that hit a true point or box."""
    predicted: int
    """Number of predicted points."""
    target: int
    """Number of true points or boxes."""


def detection_counts(
    predicted: BoxesLike, target: BoxesLike, iou_threshold: float = IOU_THRESHOLD
) -> DetectionCounts:
    """Count true positives and matched IoU of predicted against true boxes.

    Args:
        predicted: Predicted boxes, normalized ``xyxy`` (array, models or the API's dicts).
        target: True boxes, in the same form.
        iou_threshold: IoU at which a matched pair is a true positive.

    Returns:
        The counts of this image.
    """
    pred, true = as_boxes(predicted), as_boxes(target)
    _, _, iou = match_boxes(pred, true)
    return DetectionCounts(
        true_positives=int((iou >= iou_threshold).sum()),
        predicted=len(pred),
        target=len(true),
        iou_sum=float(iou.sum()),
        pairs=len(iou),
    )


def point_counts(
    predicted: PointsLike,
    *,
    points: PointsLike | None = None,
    boxes: BoxesLike | None = None,
) -> PointCounts:
    """Count predicted points that hit a true point (distance < 0.1) or a true box.

    Args:
        predicted: Predicted points, normalized.
        points: True points; a matched pair is a hit when its reward score is above zero.
        boxes: True boxes; a point is a hit when the maximum containment matching places
            it in a box, one point per box.

    Returns:
        The counts of this image.

    Raises:
        ValueError: Unless exactly one of ``points`` and ``boxes`` is given.
    """
    if (points is None) == (boxes is None):
        raise ValueError("point_counts needs exactly one of points= or boxes=")
    pred = as_points(predicted)
    if points is not None:
        true_points = as_points(points)
        hits = int((point_pair_scores(pred, true_points) > 0).sum())
        return PointCounts(hits, len(pred), len(true_points))
    true_boxes = as_boxes(boxes)
    return PointCounts(containment_matches(pred, true_boxes), len(pred), len(true_boxes))


def _ratio(numerator: Tensor, denominator: Tensor, other_side: Tensor) -> Tensor:
    """``numerator / denominator``; with nothing to divide, 1.0 if the other side is empty too."""
    if denominator > 0:
        return numerator.double() / denominator
    return torch.tensor(1.0 if other_side == 0 else 0.0, dtype=torch.float64)


def precision_recall_f1(
    true_positives: Tensor, predicted: Tensor, target: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Precision, recall and F1 from summed counts, with the module's empty-case rules.

    Args:
        true_positives: Number of true positives.
        predicted: Number of predictions.
        target: Number of true items.

    Returns:
        ``(precision, recall, f1)`` as float64 scalar tensors.
    """
    precision = _ratio(true_positives, predicted, target)
    recall = _ratio(true_positives, target, predicted)
    denominator = precision + recall
    f1 = 2 * precision * recall / denominator if denominator > 0 else torch.zeros_like(denominator)
    return precision, recall, f1


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    """Concatenate a list state; after a distributed sync it is already one tensor."""
    if isinstance(state, Tensor):
        return state
    return torch.cat(state) if state else torch.zeros(0, dtype=torch.float64)


def _boxes_of(mapping: Mapping[str, Any]) -> Any:
    return mapping.get("boxes") or []


def _points_of(mapping: Mapping[str, Any]) -> Any:
    return mapping.get("points") or []


# Metrics --------------------------------------------------------------------------------


class _MatchCounts(Metric):
    """Summed true positives, predictions and targets of a one-to-one matching.

    Args:
        prefix: Names the results ``<prefix>_precision``, ``<prefix>_recall`` and
            ``<prefix>_f1``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    true_positives: Tensor
    predicted: Tensor
    target: Tensor

    def __init__(self, prefix: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._prefix = prefix
        for name in ("true_positives", "predicted", "target"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _count(self, counts: PointCounts | DetectionCounts) -> None:
        # ``add_`` of Python numbers: no tensor is built and no module attribute is set per
        # image (``+=`` would go through ``Module.__setattr__``, the largest cost here).
        self.true_positives.add_(counts.true_positives)
        self.predicted.add_(counts.predicted)
        self.target.add_(counts.target)

    def compute(self) -> dict[str, Tensor]:
        """Return ``<prefix>_precision``, ``<prefix>_recall`` and ``<prefix>_f1``."""
        values = precision_recall_f1(self.true_positives, self.predicted, self.target)
        names = (f"{self._prefix}_{name}" for name in ("precision", "recall", "f1"))
        return dict(zip(names, values, strict=True))


class DetectionF1(_MatchCounts):
    """Detection precision, recall and F1 at IoU 0.5, and mean matched IoU.

    Uses the one-to-one maximum-IoU matching of the detect reward; see the module
    docstring for the empty cases.

    Example:
        >>> metric = DetectionF1()
        >>> metric.update([[0.1, 0.1, 0.5, 0.5]], [[0.1, 0.1, 0.5, 0.5]])
        >>> float(metric.compute()["det_f1"])
        1.0
    """

    iou_sum: Tensor
    pairs: Tensor

    def __init__(self, iou_threshold: float = IOU_THRESHOLD, **kwargs: Any) -> None:
        super().__init__("det", **kwargs)
        self.iou_threshold = iou_threshold
        self.add_state("pairs", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state(
            "iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, predicted: BoxesLike, target: BoxesLike) -> None:
        """Add one image's predicted and true boxes (normalized ``xyxy``)."""
        counts = detection_counts(predicted, target, self.iou_threshold)
        self._count(counts)
        self.iou_sum.add_(counts.iou_sum)
        self.pairs.add_(counts.pairs)

    def compute(self) -> dict[str, Tensor]:
        """Return ``det_precision``, ``det_recall``, ``det_f1`` and ``det_miou``."""
        if self.pairs > 0:
            miou = self.iou_sum / self.pairs
        else:
            empty = self.predicted == 0 and self.target == 0
            miou = torch.tensor(1.0 if empty else 0.0, dtype=torch.float64)
        return {**super().compute(), "det_miou": miou}


class PointAccuracy(_MatchCounts):
    """Point precision, recall and F1 under the matching of the point reward.

    Against true points a predicted point is a true positive when the distance-minimizing
    one-to-one matching pairs it with a point closer than 0.1 (normalized units); against
    true boxes, when the maximum containment matching places it in a box.

    Example:
        >>> metric = PointAccuracy()
        >>> metric.update([{"x": 0.5, "y": 0.5}], points=[{"x": 0.55, "y": 0.5}])
        >>> float(metric.compute()["point_f1"])
        1.0
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("point", **kwargs)

    def update(
        self,
        predicted: PointsLike,
        *,
        points: PointsLike | None = None,
        boxes: BoxesLike | None = None,
    ) -> None:
        """Add one image's predicted points against its true ``points`` or ``boxes``."""
        self._count(point_counts(predicted, points=points, boxes=boxes))


class VQAAccuracy(Metric):
    """Share of answers equal, after normalization, to any accepted answer.

    Normalization is :func:`lightning_moondream.rewards.normalize_answer`: lowercase,
    punctuation and articles removed, number words to digits.

    Example:
        >>> metric = VQAAccuracy()
        >>> metric.update("Two.", ["2", "two cats"])
        >>> float(metric.compute())
        1.0
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, prediction: str | None, answers: str | Iterable[str]) -> None:
        """Add one answer (``None`` counts as wrong) and its accepted answers."""
        self.correct.add_(int(exact_match(prediction, answers)))
        self.total.add_(1)

    def compute(self) -> Tensor:
        """Return the accuracy; 0.0 before any question is seen."""
        if self.total == 0:
            return torch.tensor(0.0, dtype=torch.float64)
        return self.correct.double() / self.total


class DetectionMAP(Metric):
    """COCO mAP of detect outputs, through torchmetrics' ``MeanAveragePrecision``.

    Boxes are scaled from normalized to pixel ``xyxy`` with each image's size; the class
    of an image's boxes is its prompt label (see :func:`label_id`). Every predicted box
    scores 1.0, because the API returns no scores: mAP is then a single-operating-point
    measure (see the module docstring).

    Boxes are kept, flattened, in concatenated states until ``compute`` builds the COCO
    evaluation once for the epoch; AP needs every detection, so these states cannot be
    summed. One image costs a few small tensors, not a call into the COCO code.

    With tied scores COCO ranks detections in the order of their images, so that order
    changes the value. ``compute`` orders images by a checksum of their content (label and
    boxes) instead of their arrival: the value is the same however images were batched,
    shuffled or split over processes.

    Args:
        backend: COCO implementation; ``None`` picks ``faster_coco_eval`` when installed,
            else ``pycocotools``.
        **kwargs: Passed to ``torchmetrics.Metric``.

    Example:
        >>> metric = DetectionMAP()
        >>> box = [{"x_min": 0.1, "y_min": 0.2, "x_max": 0.4, "y_max": 0.6}]
        >>> metric.update(box, box, label="car", image_size=(640, 480))
        >>> float(metric.compute()["map"])
        1.0
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    pred_boxes: list[Tensor]
    target_boxes: list[Tensor]
    images: list[Tensor]

    def __init__(self, backend: MapBackend | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backend: MapBackend = backend or default_map_backend()
        # Flat float64 lists: a process with no detect image gathers an empty 1-D
        # placeholder of the metric's dtype, which must match the other processes' states;
        # float64 also holds 32-bit ids exactly. ``images`` holds, per image, the number
        # of predicted boxes, the number of true boxes, the label id and a content checksum.
        for name in ("pred_boxes", "target_boxes", "images"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)
        # The states are gathered by this metric; the inner one must not gather again.
        self._map = MeanAveragePrecision(
            box_format="xyxy", iou_type="bbox", backend=self.backend, sync_on_compute=False
        )

    def update(
        self,
        predicted: BoxesLike,
        target: BoxesLike,
        label: str,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        """Add one image.

        Args:
            predicted: Predicted boxes, normalized ``xyxy``.
            target: True boxes, normalized ``xyxy``.
            label: The prompt (object description); it names the class of every box.
            image_size: ``(width, height)`` in pixels. ``None`` keeps normalized
                coordinates: IoU does not change when an axis is scaled, so ``map``,
                ``map_50`` and ``map_75`` are the same either way (only COCO's area
                ranges, which are not reported, depend on pixels).
        """
        width, height = image_size or (1, 1)
        scale = np.array([width, height, width, height], dtype=np.float64)
        pred = as_boxes(predicted) * scale
        true = as_boxes(target) * scale
        self.pred_boxes.append(torch.as_tensor(pred.reshape(-1), device=self.device))
        self.target_boxes.append(torch.as_tensor(true.reshape(-1), device=self.device))
        class_id = label_id(label)
        checksum = zlib.crc32(true.tobytes(), zlib.crc32(pred.tobytes(), class_id))
        self.images.append(
            torch.tensor(
                [len(pred), len(true), class_id, checksum], dtype=torch.float64, device=self.device
            )
        )

    def compute(self) -> dict[str, Tensor]:
        """Return ``map``, ``map_50`` and ``map_75`` (-1 when there is no true box)."""
        images = _cat(self.images).reshape(-1, 4).long().cpu()
        n_pred, n_true, labels = images[:, 0], images[:, 1], images[:, 2]
        if n_true.sum() == 0:
            missing = torch.tensor(-1.0)
            return {"map": missing, "map_50": missing.clone(), "map_75": missing.clone()}
        # Split flat tensors once rather than building each image's tensors in a loop.
        pred_sizes, true_sizes = n_pred.tolist(), n_true.tolist()
        pred_boxes = _cat(self.pred_boxes).reshape(-1, 4).float().cpu()
        true_boxes = _cat(self.target_boxes).reshape(-1, 4).float().cpu()
        preds = [
            {"boxes": boxes, "scores": scores, "labels": classes}
            for boxes, scores, classes in zip(
                torch.split(pred_boxes, pred_sizes),
                torch.split(torch.ones(len(pred_boxes)), pred_sizes),
                torch.split(labels.repeat_interleave(n_pred), pred_sizes),
                strict=True,
            )
        ]
        targets = [
            {"boxes": boxes, "labels": classes}
            for boxes, classes in zip(
                torch.split(true_boxes, true_sizes),
                torch.split(labels.repeat_interleave(n_true), true_sizes),
                strict=True,
            )
        ]
        order = torch.argsort(images[:, 3], stable=True).tolist()
        self._map.update([preds[i] for i in order], [targets[i] for i in order])
        try:
            result = self._map.compute()
        finally:
            self._map.reset()
        return {key: result[key] for key in ("map", "map_50", "map_75")}


# Entry point for the LightningModule ---------------------------------------------------


class SkillMetrics(torch.nn.Module):
    """Every metric of every skill behind one ``update``/``compute``/``reset``.

    ``update`` takes one rollout output and its target; ``compute`` returns the values of
    the skills that received updates (in any process, under distributed evaluation):

    - detect: ``map``, ``map_50``, ``map_75``, ``det_precision``, ``det_recall``,
      ``det_f1``, ``det_miou``;
    - point: ``point_precision``, ``point_recall``, ``point_f1``;
    - query: ``vqa_accuracy``.

    Args:
        map_backend: COCO implementation for mAP; ``None`` picks ``faster_coco_eval``
            when installed, else ``pycocotools``.

    Example:
        >>> metrics = SkillMetrics()
        >>> metrics.update("query", {"answer": "Red."}, {"answers": ["red"]}, None, "color?")
        >>> {key: float(value) for key, value in metrics.compute().items()}
        {'vqa_accuracy': 1.0}
    """

    def __init__(self, map_backend: MapBackend | None = None) -> None:
        super().__init__()
        self.detection_map = DetectionMAP(backend=map_backend)
        self.detection_f1 = DetectionF1()
        self.point_accuracy = PointAccuracy()
        self.vqa_accuracy = VQAAccuracy()

    def _metrics_of(self, skill: str) -> tuple[Metric, ...]:
        if skill == "detect":
            return (self.detection_map, self.detection_f1)
        if skill == "point":
            return (self.point_accuracy,)
        return (self.vqa_accuracy,)

    def update(
        self,
        skill: str,
        output: Mapping[str, Any],
        target: Mapping[str, Any],
        image_size: tuple[int, int] | None,
        label: str,
    ) -> None:
        """Add one sample.

        Args:
            skill: ``"detect"``, ``"point"`` or ``"query"``.
            output: The rollout's ``output`` JSON (``{"boxes": ...}``, ``{"points": ...}``
                or ``{"answer": ...}``); missing keys count as no prediction.
            target: ``{"boxes": ...}`` for detect; ``{"points": ...}`` or
                ``{"boxes": ...}`` for point; ``{"answers": [...]}`` for query.
            image_size: ``(width, height)`` in pixels, for mAP; ``None`` keeps normalized
                coordinates, which leaves ``map``, ``map_50`` and ``map_75`` unchanged.
            label: The prompt: the object description (the class, for mAP) or question.

        Raises:
            ValueError: For an unknown skill.
        """
        if skill == "detect":
            # Converted once here, the JSON is not parsed again by each metric.
            predicted, true = as_boxes(_boxes_of(output)), as_boxes(_boxes_of(target))
            self.detection_map.update(predicted, true, label, image_size)
            self.detection_f1.update(predicted, true)
        elif skill == "point":
            if target.get("points") is not None:
                self.point_accuracy.update(_points_of(output), points=target["points"])
            else:
                self.point_accuracy.update(_points_of(output), boxes=_boxes_of(target))
        elif skill == "query":
            self.vqa_accuracy.update(output.get("answer"), target.get("answers") or [])
        else:
            raise ValueError(f"unknown skill {skill!r}; expected one of {', '.join(SKILLS)}")

    def _updated_skills(self) -> list[str]:
        counts = torch.tensor(
            [self._metrics_of(skill)[0].update_count for skill in SKILLS],
            device=self.detection_f1.device,
        )
        # Every process must take part in the same computes (each gathers states), so the
        # skills to report are decided on the counts of all processes, not this one's.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        return [skill for skill, count in zip(SKILLS, counts.tolist(), strict=True) if count > 0]

    def compute(self) -> dict[str, Tensor]:
        """Return the metric values of the skills that received updates since ``reset``."""
        values: dict[str, Tensor] = {}
        for skill in self._updated_skills():
            for metric in self._metrics_of(skill):
                with warnings.catch_warnings():
                    # A process that saw none of this skill still computes, on the others' data.
                    warnings.filterwarnings("ignore", message=".*was called before the ``update``")
                    result = metric.compute()
                if isinstance(result, Tensor):
                    values["vqa_accuracy"] = result
                else:
                    values.update(result)
        return values

    def reset(self) -> None:
        """Clear every state, as at the start of an epoch."""
        for skill in SKILLS:
            for metric in self._metrics_of(skill):
                metric.reset()
