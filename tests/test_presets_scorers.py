"""Benchmark scorers against hand-computed cases, including the tricky ones."""

from __future__ import annotations

import pytest
from support import box

from lightning_moondream.presets import BENCHMARKS, DetectionScores, MeanScore, YesNoScores
from lightning_moondream.presets.scorers import (
    ReferringScores,
    anls,
    eleven_point_ap,
    plain_match,
    relaxed_accuracy,
    yes_no,
)
from lightning_moondream.presets.vqa import vqa_accuracy


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("12%", "0.12", 1.0),  # a percentage is a hundredth
        ("0.12", "12%", 1.0),
        ("0.127", "12%", 0.0),  # 5.8% away
        ("104", "100", 1.0),
        ("106", "100", 0.0),
        ("Yes ", "yes", 1.0),  # text: stripped, lowercased, exact
        ("yes.", "yes", 0.0),
        ("0", "0", 1.0),  # zero target: exact match only
        ("0.01", "0", 0.0),
        ("[10, 20]", "[10.4, 19.5]", 1.0),  # lists element-wise
        ("[10, 20]", "[10, 30]", 0.0),
        ('["a", "B"]', '["A", "b"]', 1.0),
        ("[10]", "[10, 20]", 0.0),  # lengths differ: compared as texts
        (None, "1", 0.0),
    ],
)
def test_chartqa_relaxed_accuracy(prediction: str | None, answer: str, expected: float) -> None:
    assert relaxed_accuracy(prediction, answer) == expected


def test_textvqa_normalizes_articles_and_punctuation_and_caps_at_three_matches() -> None:
    answers = ["the cat", "Cat.", "a cat"] + ["dog"] * 7
    assert vqa_accuracy("CAT!", answers) == 1.0
    assert vqa_accuracy("cat", answers[1:]) == pytest.approx(2 / 3)
    assert vqa_accuracy("cat", ["cat"] + ["x"] * 9) == pytest.approx(1 / 3)
    assert vqa_accuracy("dog", answers) == 1.0  # 7 matches, still at most 1
    assert vqa_accuracy("cats", answers) == 0.0
    assert vqa_accuracy(None, answers) == 0.0


def test_anls_keeps_similarities_from_the_threshold_up() -> None:
    assert anls("hello", ["hallo"]) == pytest.approx(0.8)
    assert anls("abcd", ["abxy"]) == pytest.approx(0.5)  # exactly at the threshold
    assert anls("abcde", ["axyze"]) == 0.0  # 0.4, below it
    assert anls(" Invoice ", ["invoice"]) == 1.0
    assert anls("hello", ["zzzzz", "hell"]) == pytest.approx(0.8)  # best answer
    assert anls(None, ["x"]) == 0.0


def test_plain_match_and_yes_no_reading() -> None:
    assert plain_match(" 3 ", "3") == 1.0
    assert plain_match("three", "3") == 0.0  # Moondream's count scripts compare text
    assert yes_no("No.") == "no" and yes_no("Yes, there is") == "yes"
    assert yes_no("maybe") is None


def test_pope_f1_when_every_answer_is_yes() -> None:
    metric = YesNoScores(("adversarial", "popular", "random"))
    cases = [("adversarial", "yes"), ("adversarial", "no"), ("popular", "yes"), ("popular", "no")]
    for group, truth in cases:
        metric.update({"answer": "Yes"}, {"answers": [truth]}, group)
    result = {key: float(value) for key, value in metric.compute().items()}
    # tp=2 fp=2 fn=0 tn=0: precision 1/2, recall 1, F1 2/3, accuracy 1/2.
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["precision"] == pytest.approx(0.5)
    assert result["recall"] == pytest.approx(1.0)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["accuracy_adversarial"] == pytest.approx(0.5)
    assert result["f1_popular"] == pytest.approx(2 / 3)
    assert "accuracy_random" not in result  # no question of that group


def test_pope_counts_an_unreadable_answer_as_wrong() -> None:
    metric = YesNoScores(("random",))
    metric.update({"answer": "I cannot tell"}, {"answers": ["yes"]}, "random")
    metric.update({"answer": "I cannot tell"}, {"answers": ["no"]}, "random")
    metric.update({"answer": "no"}, {"answers": ["no"]}, "random")
    result = metric.compute()
    assert float(result["accuracy"]) == pytest.approx(1 / 3)
    assert float(result["f1"]) == 0.0  # no true positive
    with pytest.raises(ValueError, match="unknown group 'other'"):
        metric.update({"answer": "no"}, {"answers": ["no"]}, "other")


def test_grouped_mean_reports_total_and_each_group() -> None:
    metric = BENCHMARKS["chartqa"].metric()
    metric.update({"answer": "12%"}, {"answers": ["0.12"]}, "human")
    metric.update({"answer": "7"}, {"answers": ["8"]}, "augmented")
    metric.update({"answer": "8"}, {"answers": ["8"]}, "augmented")
    result = {key: float(value) for key, value in metric.compute().items()}
    assert result == pytest.approx(
        {"accuracy": 2 / 3, "accuracy_human": 1.0, "accuracy_augmented": 0.5}
    )
    assert isinstance(metric, MeanScore)


def test_eleven_point_ap_matches_greedily_with_confidence_one() -> None:
    truth = [box(0.1, 0.1, 0.4, 0.4)]
    assert eleven_point_ap([box(0.1, 0.1, 0.4, 0.4), box(0.1, 0.1, 0.4, 0.41)], truth) == 1.0
    # A miss first: precision 0 then 1/2 at full recall, so 1/2 at every level.
    miss_first = [box(0.6, 0.6, 0.9, 0.9), box(0.1, 0.1, 0.4, 0.4)]
    assert eleven_point_ap(miss_first, truth) == pytest.approx(0.5)
    # Two true boxes, one found: precision 1 up to recall 1/2 (levels 0 to 0.5: 6 of 11).
    two = [*truth, box(0.6, 0.6, 0.9, 0.9)]
    assert eleven_point_ap(truth, two) == pytest.approx(6 / 11)
    assert eleven_point_ap([], truth) == 0.0


def test_moondream_coco_protocol_weighs_labels_by_frequency_unlike_coco_map() -> None:
    metric = DetectionScores()
    cat = [box(0.1, 0.1, 0.5, 0.5)]
    for _ in range(3):  # cat found in three images
        metric.update({"boxes": cat}, {"boxes": cat}, label="cat", image_size=(100, 100))
    dog = [box(0.2, 0.2, 0.6, 0.6)]
    metric.update({"boxes": []}, {"boxes": dog}, label="dog", image_size=(100, 100))
    result = {key: float(value) for key, value in metric.compute().items()}
    assert result["moondream_map"] == pytest.approx(3 / 4)  # mean over 4 (image, label)
    assert result["map_50"] == pytest.approx(0.5)  # COCO: mean over 2 classes (1 and 0)


def test_referring_scores_use_the_first_box() -> None:
    metric = ReferringScores()
    truth = {"boxes": [box(0.0, 0.0, 0.5, 0.5)]}
    metric.update({"boxes": [box(0.0, 0.0, 0.5, 0.5), box(0.5, 0.5, 1, 1)]}, truth)
    metric.update({"boxes": [box(0.0, 0.0, 0.25, 0.5)]}, truth)  # IoU 0.5: a hit
    metric.update({"boxes": []}, truth)
    result = metric.compute()
    assert float(result["accuracy"]) == pytest.approx(2 / 3)
    assert float(result["miou"]) == pytest.approx(1.5 / 3)
