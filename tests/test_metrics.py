from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from support import box, computed

from lightning_moondream.metrics import (
    DetectionF1,
    DetectionMAP,
    PointAccuracy,
    SkillMetrics,
    VQAAccuracy,
    detection_counts,
    label_id,
    point_counts,
)
from lightning_moondream.rewards import match_boxes


def point(x: float, y: float) -> dict[str, float]:
    return {"x": x, "y": y}


# One true box found exactly, one found shifted by half its width (IoU 1/3), one extra
# prediction far from everything.
TRUE_BOXES = [box(0.0, 0.0, 0.2, 0.2), box(0.5, 0.5, 0.7, 0.7)]
PRED_BOXES = [box(0.0, 0.0, 0.2, 0.2), box(0.6, 0.5, 0.8, 0.7), box(0.9, 0.9, 0.95, 0.95)]


# Detection F1 ---------------------------------------------------------------------------


def test_detection_f1_hand_computed() -> None:
    metric = DetectionF1()
    metric.update(PRED_BOXES, TRUE_BOXES)
    result = computed(metric)
    # 1 true positive (the IoU-1/3 pair is below 0.5), 3 predictions, 2 true boxes.
    assert result["det_precision"] == pytest.approx(1 / 3)
    assert result["det_recall"] == pytest.approx(1 / 2)
    assert result["det_f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    # Two matched pairs: IoU 1 and 1/3.
    assert result["det_miou"] == pytest.approx((1 + 1 / 3) / 2)


def test_detection_f1_accumulates_over_images() -> None:
    metric = DetectionF1()
    metric.update([box(0.0, 0.0, 0.2, 0.2)], [box(0.0, 0.0, 0.2, 0.2)])
    metric.update([], [box(0.5, 0.5, 0.7, 0.7)])
    result = computed(metric)
    assert result["det_precision"] == 1.0
    assert result["det_recall"] == 0.5
    assert result["det_f1"] == pytest.approx(2 / 3)
    assert result["det_miou"] == 1.0


@pytest.mark.parametrize(
    ("predicted", "target", "expected"),
    [
        pytest.param([], [], 1.0, id="nothing"),
        pytest.param([box(0.1, 0.1, 0.2, 0.2)], [], 0.0, id="only-predictions"),
        pytest.param([], [box(0.1, 0.1, 0.2, 0.2)], 0.0, id="only-targets"),
    ],
)
def test_detection_f1_empty_cases(
    predicted: list[dict[str, float]], target: list[dict[str, float]], expected: float
) -> None:
    # Nothing to divide scores 1.0 when the other side is empty too, else 0.0.
    metric = DetectionF1()
    metric.update(predicted, target)
    names = ("det_precision", "det_recall", "det_f1", "det_miou")
    assert computed(metric) == dict.fromkeys(names, expected)


def test_detection_f1_agrees_with_reward_matching() -> None:
    rng = np.random.default_rng(0)
    metric = DetectionF1()
    expected_tp = expected_pred = expected_true = 0
    expected_iou: list[float] = []
    for _ in range(50):
        n_pred, n_true = rng.integers(0, 5, size=2)
        corners = rng.uniform(0.0, 0.6, size=(n_pred + n_true, 2))
        sides = rng.uniform(0.05, 0.4, size=(n_pred + n_true, 2))
        boxes = np.hstack([corners, corners + sides])
        pred, true = boxes[:n_pred], boxes[n_pred:]
        metric.update(pred, true)
        _, _, iou = match_boxes(pred, true)
        expected_tp += int((iou >= 0.5).sum())
        expected_pred += n_pred
        expected_true += n_true
        expected_iou.extend(iou.tolist())
    assert int(metric.true_positives) == expected_tp
    assert int(metric.predicted) == expected_pred
    assert int(metric.target) == expected_true
    result = computed(metric)
    assert result["det_precision"] == pytest.approx(expected_tp / expected_pred)
    assert result["det_recall"] == pytest.approx(expected_tp / expected_true)
    assert result["det_miou"] == pytest.approx(float(np.mean(expected_iou)))


def test_detection_counts_threshold_is_inclusive() -> None:
    # IoU exactly 0.5 (in binary too): a box covering half of the true box.
    counts = detection_counts([box(0.0, 0.0, 0.25, 0.5)], [box(0.0, 0.0, 0.5, 0.5)])
    assert counts.true_positives == 1
    assert counts.iou_sum == pytest.approx(0.5)
    half = detection_counts([box(0.0, 0.0, 0.25, 0.5)], [box(0.0, 0.0, 0.5, 0.5)], 0.6)
    assert half.true_positives == 0


# mAP ------------------------------------------------------------------------------------


def test_map_of_perfect_predictions_is_one() -> None:
    metric = DetectionMAP()
    metric.update(TRUE_BOXES, TRUE_BOXES, label="car", image_size=(640, 480))
    metric.update([box(0.1, 0.1, 0.3, 0.9)], [box(0.1, 0.1, 0.3, 0.9)], "person", (320, 200))
    assert computed(metric) == {"map": 1.0, "map_50": 1.0, "map_75": 1.0}


def test_map_averages_over_prompt_classes() -> None:
    metric = DetectionMAP()
    metric.update([box(0.1, 0.1, 0.3, 0.3)], [box(0.1, 0.1, 0.3, 0.3)], "cat", (100, 100))
    metric.update([box(0.6, 0.6, 0.9, 0.9)], [box(0.1, 0.1, 0.3, 0.3)], "dog", (100, 100))
    # AP 1 for "cat", 0 for "dog"; the mean is over classes.
    assert computed(metric) == pytest.approx({"map": 0.5, "map_50": 0.5, "map_75": 0.5})


def test_map_separates_iou_thresholds() -> None:
    metric = DetectionMAP()
    # IoU 0.62: a hit at 0.5, a miss at 0.75.
    metric.update([box(0.0, 0.0, 0.62, 1.0)], [box(0.0, 0.0, 1.0, 1.0)], "thing", (200, 100))
    result = computed(metric)
    assert result["map_50"] == pytest.approx(1.0)
    assert result["map_75"] == pytest.approx(0.0)
    # COCO thresholds 0.5, 0.55, 0.6 count the pair as a hit: 3 of 10.
    assert result["map"] == pytest.approx(0.3)


def test_map_without_image_size_matches_pixels() -> None:
    pixel, normalized = DetectionMAP(), DetectionMAP()
    rng = np.random.default_rng(1)
    for index in range(20):
        corners = rng.uniform(0.0, 0.6, size=(6, 2))
        boxes = np.hstack([corners, corners + rng.uniform(0.05, 0.4, size=(6, 2))])
        pred, true = boxes[:3], boxes[3:]
        pixel.update(pred, true, f"class {index % 3}", (1280, 240))
        normalized.update(pred, true, f"class {index % 3}", None)
    assert computed(pixel) == pytest.approx(computed(normalized))


def test_map_without_true_boxes_is_minus_one() -> None:
    metric = DetectionMAP()
    metric.update([box(0.1, 0.1, 0.2, 0.2)], [], "car", (10, 10))
    assert computed(metric) == {"map": -1.0, "map_50": -1.0, "map_75": -1.0}


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_map_single_operating_point(backend: str) -> None:
    metric = DetectionMAP(backend=backend)  # type: ignore[arg-type]
    metric.update(PRED_BOXES, TRUE_BOXES, "car", (640, 480))
    # Tied scores keep the output order: hit, miss, miss at IoU 0.5. Interpolated precision
    # is 1 up to recall 1/2 (51 of the 101 recall thresholds), then 0.
    assert float(metric.compute()["map_50"]) == pytest.approx(51 / 101)


def test_map_does_not_depend_on_image_order() -> None:
    forward, backward = DetectionMAP(), DetectionMAP()
    images = [(PRED_BOXES, TRUE_BOXES), (TRUE_BOXES, TRUE_BOXES), ([], TRUE_BOXES[:1])]
    for predicted, true in images:
        forward.update(predicted, true, "car", (640, 480))
    for predicted, true in reversed(images):
        backward.update(predicted, true, "car", (640, 480))
    result = computed(forward)
    assert result == computed(backward)
    assert 0.0 < result["map_50"] < 1.0


def test_label_ids_are_stable_and_distinct() -> None:
    assert label_id("car") == label_id("car")
    assert label_id("car") != label_id("cars")
    assert 0 <= label_id("a long prompt about a red car") < 2**31


# Points ---------------------------------------------------------------------------------


def test_point_distance_threshold() -> None:
    metric = PointAccuracy()
    metric.update([point(0.5, 0.5)], points=[point(0.55, 0.5)])  # 0.05 away: a hit
    metric.update([point(0.5, 0.5)], points=[point(0.5, 0.7)])  # 0.2 away: a miss
    result = computed(metric)
    assert result == pytest.approx({"point_precision": 0.5, "point_recall": 0.5, "point_f1": 0.5})


def test_point_matching_is_one_to_one() -> None:
    # Two predictions near one true point: only one can be matched to it.
    counts = point_counts([point(0.5, 0.5), point(0.52, 0.5)], points=[point(0.51, 0.5)])
    assert counts == (1, 2, 1)
    metric = PointAccuracy()
    metric.update([point(0.5, 0.5), point(0.52, 0.5)], points=[point(0.51, 0.5)])
    result = computed(metric)
    assert result["point_precision"] == 0.5
    assert result["point_recall"] == 1.0
    assert result["point_f1"] == pytest.approx(2 / 3)


def test_point_containment() -> None:
    boxes = [box(0.0, 0.0, 0.5, 0.5), box(0.5, 0.5, 1.0, 1.0)]
    # Two points in the first box (only one can claim it), one outside both boxes.
    predicted = [point(0.1, 0.1), point(0.2, 0.2), point(0.9, 0.1)]
    assert point_counts(predicted, boxes=boxes) == (1, 3, 2)
    metric = PointAccuracy()
    metric.update(predicted, boxes=boxes)
    result = computed(metric)
    assert result["point_precision"] == pytest.approx(1 / 3)
    assert result["point_recall"] == pytest.approx(1 / 2)


def test_point_counts_need_one_kind_of_target() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        point_counts([point(0.1, 0.1)])


# VQA ------------------------------------------------------------------------------------


def test_vqa_accuracy_normalizes_answers() -> None:
    metric = VQAAccuracy()
    metric.update("Two.", ["2"])
    metric.update("The red car", "red car")
    metric.update("blue", ["red", "crimson"])
    metric.update(None, ["red"])
    assert float(metric.compute()) == pytest.approx(0.5)


def test_vqa_accuracy_without_questions_is_zero() -> None:
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert float(VQAAccuracy().compute()) == 0.0


# SkillMetrics ---------------------------------------------------------------------------


def test_skill_metrics_reports_only_updated_skills() -> None:
    metrics = SkillMetrics()
    assert metrics.compute() == {}
    metrics.update(
        "point", {"points": [point(0.5, 0.5)]}, {"points": [point(0.52, 0.5)]}, None, "dot"
    )
    assert set(metrics.compute()) == {"point_precision", "point_recall", "point_f1"}
    metrics.update("detect", {"boxes": PRED_BOXES}, {"boxes": TRUE_BOXES}, (64, 48), "car")
    metrics.update("query", {"answer": "yes"}, {"answers": ["no"]}, None, "Is it red?")
    result = computed(metrics)
    assert set(result) == {
        "map",
        "map_50",
        "map_75",
        "det_precision",
        "det_recall",
        "det_f1",
        "det_miou",
        "point_precision",
        "point_recall",
        "point_f1",
        "vqa_accuracy",
    }
    assert result["det_recall"] == 0.5
    assert result["point_f1"] == 1.0
    assert result["vqa_accuracy"] == 0.0


def test_skill_metrics_point_with_boxes_and_missing_output() -> None:
    metrics = SkillMetrics()
    metrics.update(
        "point", {"points": [point(0.1, 0.1)]}, {"boxes": [box(0.0, 0.0, 0.2, 0.2)]}, None, "a"
    )
    metrics.update("point", {}, {"boxes": [box(0.5, 0.5, 0.6, 0.6)]}, None, "b")
    result = computed(metrics)
    assert result == pytest.approx({"point_precision": 1.0, "point_recall": 0.5, "point_f1": 2 / 3})


def test_skill_metrics_reset() -> None:
    metrics = SkillMetrics()
    metrics.update("detect", {"boxes": []}, {"boxes": TRUE_BOXES}, (10, 10), "car")
    metrics.update("query", {"answer": "red"}, {"answers": ["red"]}, None, "color?")
    assert computed(metrics)["vqa_accuracy"] == 1.0
    metrics.reset()
    assert metrics.compute() == {}
    metrics.update("query", {"answer": "blue"}, {"answers": ["red"]}, None, "color?")
    assert computed(metrics) == {"vqa_accuracy": 0.0}


def test_skill_metrics_rejects_unknown_skill() -> None:
    with pytest.raises(ValueError, match="unknown skill 'caption'"):
        SkillMetrics().update("caption", {}, {}, None, "x")


# Distributed-style merging ---------------------------------------------------------------

SAMPLES: list[tuple[str, dict[str, Any], dict[str, Any], tuple[int, int] | None, str]] = [
    ("detect", {"boxes": PRED_BOXES}, {"boxes": TRUE_BOXES}, (640, 480), "car"),
    ("detect", {"boxes": TRUE_BOXES}, {"boxes": TRUE_BOXES}, (640, 480), "car"),
    (
        "detect",
        {"boxes": [box(0.1, 0.1, 0.4, 0.4)]},
        {"boxes": [box(0.1, 0.1, 0.4, 0.5)]},
        None,
        "dog",
    ),
    ("point", {"points": [point(0.5, 0.5)]}, {"points": [point(0.55, 0.5)]}, None, "dot"),
    (
        "point",
        {"points": [point(0.5, 0.5), point(0.1, 0.1)]},
        {"boxes": [box(0.4, 0.4, 0.6, 0.6)]},
        None,
        "dot",
    ),
    ("query", {"answer": "Three"}, {"answers": ["3"]}, None, "How many?"),
    ("query", {"answer": "red"}, {"answers": ["blue"]}, None, "Color?"),
]


def test_merged_states_equal_single_process() -> None:
    whole, first, second = SkillMetrics(), SkillMetrics(), SkillMetrics()
    for index, sample in enumerate(SAMPLES):
        whole.update(*sample)
        (first if index % 2 == 0 else second).update(*sample)
    for name in ("detection_map", "detection_f1", "point_accuracy", "vqa_accuracy"):
        getattr(first, name).merge_state(getattr(second, name))
    assert int(first.detection_f1.predicted) == 3 + 2 + 1
    assert int(first.vqa_accuracy.total) == 2
    assert computed(first) == pytest.approx(computed(whole))


def _distributed_worker(rank: int, world_size: int, init_file: str, queue: mp.Queue) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        metrics = SkillMetrics()
        # Rank 1 sees no detect sample at all: it must still join every gather.
        for index, sample in enumerate(SAMPLES):
            if (index % 2 == rank and sample[0] != "detect") or (
                rank == 0 and sample[0] == "detect"
            ):
                metrics.update(*sample)
        queue.put((rank, computed(metrics)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two Python processes: about 25 s on two cores
def test_distributed_sync_matches_single_process(tmp_path: Path) -> None:
    whole = SkillMetrics()
    for sample in SAMPLES:
        whole.update(*sample)
    expected = computed(whole)
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=_distributed_worker, args=(rank, 2, str(tmp_path / "init"), queue))
        for rank in range(2)
    ]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    for rank in range(2):
        assert results[rank] == pytest.approx(expected), rank
    assert not any(math.isnan(value) for value in expected.values())
