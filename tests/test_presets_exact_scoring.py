"""Each benchmark's published scoring rule, pinned where a lenient reading would differ."""

from __future__ import annotations

import pytest
from support import box, computed

from lightning_moondream.presets import BENCHMARKS, PairedScores, YesNoScores
from lightning_moondream.presets.scorers import (
    RECALL_LEVELS,
    anls,
    eleven_point_ap,
    pair_group,
    relaxed_accuracy,
)
from lightning_moondream.presets.vqa import normalize_vqa_answer, vqa_accuracy

# POPE ----------------------------------------------------------------------------------


def test_pope_accuracy_is_exact_equality_with_the_label_and_lenient_is_extra() -> None:
    metric = YesNoScores(("adversarial", "popular", "random"))
    answers = [
        ("adversarial", " YES ", "yes"),  # stripped and lowercased: right
        ("adversarial", "Yes, there is a dog.", "yes"),  # first word yes: still wrong
        ("popular", "No.", "no"),  # trailing period: wrong
        ("popular", "no", "no"),
        ("random", "yes", "no"),
    ]
    for group, answer, label in answers:
        metric.update({"answer": answer}, {"answers": [label]}, group)
    scores = computed(metric)
    assert scores["accuracy_adversarial"] == pytest.approx(1 / 2)
    assert scores["accuracy_popular"] == pytest.approx(1 / 2)
    assert scores["accuracy_random"] == 0.0
    assert scores["accuracy"] == pytest.approx(2 / 5)
    assert scores["accuracy_lenient"] == pytest.approx(4 / 5)
    assert scores["accuracy_lenient_adversarial"] == 1.0
    # F1 on the exact reading, a wrong answer counting against its label: tp=1 (" YES "),
    # fn=1 ("Yes, there is"), fp=2 ("No." and "yes" for no), tn=1.
    assert scores["precision"] == pytest.approx(1 / 3)
    assert scores["recall"] == pytest.approx(1 / 2)
    assert scores["f1"] == pytest.approx(2 / 5)


def test_pope_label_is_read_lowercased_and_must_be_yes_or_no() -> None:
    metric = YesNoScores(("random",))
    metric.update({"answer": "yes"}, {"answers": ["Yes"]}, "random")
    assert computed(metric)["accuracy"] == 1.0
    with pytest.raises(ValueError, match="a yes/no target needs 'yes' or 'no'"):
        metric.update({"answer": "yes"}, {"answers": ["yes, there is"]}, "random")


# COCO ----------------------------------------------------------------------------------


def _ten_boxes() -> list[dict[str, float]]:
    return [box(0.05 * i, 0.0, 0.05 * i + 0.04, 0.04) for i in range(10)]


@pytest.mark.parametrize(
    ("found", "levels_reached"),
    [
        (3, 3),  # recall 0.3 misses the level 0.30000000000000004: 0, 0.1, 0.2
        (5, 6),  # recall 0.5 reaches 0.5 exactly: 0 to 0.5
        (6, 6),  # recall 0.6 misses 0.6000000000000001
        (7, 7),  # recall 0.7 misses 0.7000000000000001
        (8, 9),  # recall 0.8 reaches 0.8
        (10, 11),
    ],
)
def test_coco_ap_recall_levels_are_floats_so_three_six_seven_tenths_fall_short(
    found: int, levels_reached: int
) -> None:
    truth = _ten_boxes()
    assert eleven_point_ap(truth[:found], truth) == pytest.approx(levels_reached / 11)


def test_coco_recall_levels_are_eleven_tenths_as_floats() -> None:
    assert len(RECALL_LEVELS) == 11
    assert RECALL_LEVELS[3] > 0.3 and RECALL_LEVELS[6] > 0.6 and RECALL_LEVELS[7] > 0.7
    assert RECALL_LEVELS[5] == 0.5 and RECALL_LEVELS[10] == 1.0


# TextVQA -------------------------------------------------------------------------------


def test_textvqa_unanimous_human_answers_are_only_stripped() -> None:
    # The answer is normalized to "cat"; ten identical "The Cat" stay as they are.
    assert vqa_accuracy("The Cat", ["The Cat"] * 10) == 0.0
    assert vqa_accuracy("The Cat!", [" cat\n"] * 10) == 1.0


def test_textvqa_differing_human_answers_are_normalized_on_both_sides() -> None:
    answers = ["The Cat"] * 9 + ["cat."]
    assert vqa_accuracy("the cat", answers) == 1.0


def test_textvqa_score_is_matches_over_three_without_leave_one_out_averaging() -> None:
    # Three matches of ten give 1.0 (averaging over leave-one-out subsets would give 0.9).
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == 1.0
    assert vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("Two Dogs", "2 dogs"),  # number words to digits
        ("eleven", "eleven"),  # only none and zero to ten
        ("none", "0"),
        ("an apple", "apple"),  # articles dropped
        ("dont know", "don't know"),  # apostrophes restored
        ("don't", "don't"),  # and kept
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted everywhere
        ("1,000 (approx)", "1000 approx"),
        ("e-mail", "e mail"),  # not touching a space: a space
        ("red - blue", "red blue"),  # touching a space: deleted
        ("st.louis", "stlouis"),  # a period not before a digit is deleted
        ("3.5 m.", "3.5 m"),
    ],
)
def test_textvqa_answer_normalization(text: str, normalized: str) -> None:
    assert normalize_vqa_answer(text) == normalized


def test_textvqa_deletes_at_most_32_periods() -> None:
    assert normalize_vqa_answer("." * 40) == "." * 8


def test_textvqa_number_words_past_ten_do_not_match_digits() -> None:
    assert vqa_accuracy("eleven", ["11"] * 3 + ["12"]) == 0.0
    assert vqa_accuracy("ten", ["10"] * 3 + ["12"]) == 1.0


# ChartQA -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("12%%", "0.12", 1.0),  # every trailing percent sign stripped before reading
        ("[0.12]", '["12%"]', 1.0),  # list elements compared with the relaxed rule
        ("1, 2", "[1, 2]", 0.0),  # not a list on one side: compared as texts
        ("[1, 2]", "[2, 1]", 0.0),  # element by element, in order
        ("[1.0]", "[1]", 1.0),  # as lists, 1.0 and 1 are the same number
        ("[1.0", "[1", 0.0),  # not JSON: compared as texts
        ("1e2", "100", 1.0),  # any float syntax reads as a number
        ("12", "12.0", 1.0),
        ("twelve", "12", 0.0),
    ],
)
def test_chartqa_relaxed_accuracy_rules(prediction: str, answer: str, expected: float) -> None:
    assert relaxed_accuracy(prediction, answer) == expected


def test_chartqa_reports_human_split_and_all_questions() -> None:
    metric = BENCHMARKS["chartqa"].metric()
    metric.update({"answer": "5"}, {"answers": ["5"]}, "human")
    metric.update({"answer": "6"}, {"answers": ["5"]}, "augmented")
    scores = computed(metric)
    assert scores["accuracy"] == pytest.approx(1 / 2)
    assert scores["accuracy_human"] == 1.0


# Exact-match benchmarks and DocVQA ----------------------------------------------------


@pytest.mark.parametrize("name", ["countbenchqa", "tallyqa", "realworldqa", "mmstar"])
def test_exact_match_benchmarks_only_strip_and_lowercase(name: str) -> None:
    metric = BENCHMARKS[name].metric()
    metric.update({"answer": " B \n"}, {"answers": ["b"]})
    metric.update({"answer": "B."}, {"answers": ["B"]})  # punctuation is not removed
    metric.update({"answer": "three"}, {"answers": ["3"]})  # nor number words read
    metric.update({"answer": "The answer is B"}, {"answers": ["B"]})
    assert computed(metric)["accuracy"] == pytest.approx(1 / 4)


def test_tallyqa_reports_full_accuracy_and_the_simple_questions() -> None:
    metric = BENCHMARKS["tallyqa"].metric()
    metric.update({"answer": "2"}, {"answers": ["2"]}, "simple")
    metric.update({"answer": "2"}, {"answers": ["3"]}, "simple")
    metric.update({"answer": "1"}, {"answers": ["1"]}, "complex")
    scores = computed(metric)
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["accuracy_simple"] == pytest.approx(1 / 2)


def test_docvqa_anls_compares_lowercased_text_without_normalizing_punctuation() -> None:
    assert anls("INVOICE", ["invoice"]) == 1.0
    assert anls("$5", ["5"]) == pytest.approx(0.5)  # one edit of two: kept at 0.5
    assert anls("5.00", ["5"]) == 0.0  # three edits of four: below 0.5


# NaturalBench --------------------------------------------------------------------------


def _answer(metric: PairedScores, row: int, image: int, question: int, right: bool) -> None:
    truth = "yes"
    metric.update(
        {"answer": truth if right else "no"}, {"answers": [truth]}, pair_group(row, image, question)
    )


def test_naturalbench_scores_question_image_and_group_accuracy() -> None:
    metric = PairedScores()
    # Row 0: all four right.
    for image in (0, 1):
        for question in (0, 1):
            _answer(metric, 0, image, question, True)
    # Row 1: question 0 right on both images, question 1 right on image 0 only.
    _answer(metric, 1, 0, 0, True)
    _answer(metric, 1, 1, 0, True)
    _answer(metric, 1, 0, 1, True)
    _answer(metric, 1, 1, 1, False)
    scores = computed(metric)
    assert scores["accuracy"] == pytest.approx(7 / 8)
    assert scores["question_accuracy"] == pytest.approx(3 / 4)  # (1,q1) fails
    assert scores["image_accuracy"] == pytest.approx(3 / 4)  # (1,image 1) fails
    assert scores["group_accuracy"] == pytest.approx(1 / 2)


def test_naturalbench_compares_stripped_lowercased_answers() -> None:
    metric = PairedScores()
    metric.update({"answer": " Yes\n"}, {"answers": ["yes"]}, pair_group(0, 0, 0))
    metric.update({"answer": "Yes."}, {"answers": ["yes"]}, pair_group(0, 1, 0))
    scores = computed(metric)
    assert scores["accuracy"] == pytest.approx(1 / 2)
    assert scores["question_accuracy"] == 0.0


def test_naturalbench_counts_only_complete_pairs_and_groups() -> None:
    metric = PairedScores()
    _answer(metric, 4, 0, 0, True)
    _answer(metric, 4, 1, 0, True)
    _answer(metric, 4, 0, 1, True)
    scores = computed(metric)
    assert scores == pytest.approx(
        {"accuracy": 1.0, "question_accuracy": 1.0, "image_accuracy": 1.0}
    )  # no group of four is complete


def test_naturalbench_states_merged_from_two_processes_equal_one() -> None:
    whole, first, second = PairedScores(), PairedScores(), PairedScores()
    places = [(row, image, question) for row in range(3) for question in (0, 1) for image in (0, 1)]
    for position, (row, image, question) in enumerate(places):
        right = (row + image + question) % 3 != 0
        _answer(whole, row, image, question, right)
        # Alternate prompts, as processes share them: each row is split across both.
        _answer(first if position % 2 else second, row, image, question, right)
    first.merge_state(second)
    assert computed(first) == pytest.approx(computed(whole))
    assert set(computed(whole)) == {
        "accuracy", "question_accuracy", "image_accuracy", "group_accuracy"
    }  # fmt: skip


def test_naturalbench_refuses_a_group_that_is_not_row_image_question() -> None:
    metric = PairedScores()
    with pytest.raises(ValueError, match="group 'random' is not 'ROW/IMAGE/QUESTION'"):
        metric.update({"answer": "yes"}, {"answers": ["yes"]}, "random")
    with pytest.raises(ValueError, match="image and question are 0 or 1"):
        metric.update({"answer": "yes"}, {"answers": ["yes"]}, "3/2/0")
