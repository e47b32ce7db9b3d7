r"""The VQA score of TextVQA as Moondream's evaluation publishes it.

The answer normalization is the one of the VQA challenge's evaluation code, with its
quirks kept, because published numbers carry them:

- punctuation (``; / [ ] " { } ( ) = + \ _ - > < @ ` , ? !``) is deleted where it touches
  a space, or everywhere when the text holds a digit-comma-digit (``1,000``), and
  replaced by a space otherwise; then at most 32 periods not followed by a digit are
  deleted;
- words are lowercased, the number words ``none`` and ``zero`` to ``ten`` become digits,
  the articles ``a``, ``an``, ``the`` are dropped, and a contraction written without its
  apostrophe gets it back (``dont`` -> ``don't``).

:func:`vqa_accuracy` compares the normalized answer with the human answers *only stripped*
when they all agree, and normalizes both sides once more when they differ.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
MAX_PERIODS_DELETED = 32
"""The evaluation code passes ``re.UNICODE`` (32) where ``re.sub`` takes its count."""
MATCHES_FOR_FULL_SCORE = 3

_CONTRACTED = (
    "'ow's'at", "'twas", "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've",
    "didn't", "doesn't", "don't", "hadn't", "hadn't've", "hasn't", "haven't", "he'd",
    "he'd've", "he's", "how'd", "how'll", "how's", "isn't", "it'd", "it'd've", "it'll",
    "ma'am", "might've", "mightn't", "mightn't've", "must've", "mustn't", "needn't",
    "not've", "o'clock", "oughtn't", "shan't", "she'd've", "should've", "shouldn't",
    "shouldn't've", "somebody'd've", "somebody'll", "somebody's", "someone'd",
    "someone'd've", "someone'll", "someone's", "something'd", "something'd've",
    "something'll", "that's", "there'd", "there'd've", "there're", "there's", "they'd",
    "they'd've", "they'll", "they're", "they've", "wasn't", "we'd've", "we've", "weren't",
    "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've",
    "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't",
    "would've", "wouldn't", "wouldn't've", "y'all", "y'all'd've", "y'all'll", "you'd",
    "you'd've", "you'll", "you're", "you've",
)  # fmt: skip


def _one_apostrophe_dropped(word: str) -> list[str]:
    return [word[:at] + word[at + 1 :] for at, char in enumerate(word) if char == "'"]


CONTRACTIONS = {
    variant: word for word in _CONTRACTED for variant in _one_apostrophe_dropped(word)
} | {"somebody'd": "somebodyd"}
"""A word as written (one apostrophe left out) -> its contraction.

The table's one entry the other way round (``somebody'd`` -> ``somebodyd``) is kept.
"""

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def strip_punctuation(text: str) -> str:
    """The punctuation rule (module docstring) applied to ``text``."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    result = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        result = result.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", result, count=MAX_PERIODS_DELETED)


def normalize_words(text: str) -> str:
    """Lowercased words, number words as digits, no articles, contractions restored."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def _clean_spaces(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(text: str) -> str:
    """An answer normalized: spaces cleaned, then punctuation, then words."""
    return normalize_words(strip_punctuation(_clean_spaces(text)))


def vqa_accuracy(prediction: str | None, answers: Sequence[str]) -> float:
    """``min(1, matches / 3)``: how many human ``answers`` equal ``prediction``.

    The prediction is normalized (:func:`normalize_vqa_answer`); the human answers are
    only stripped, so a prediction normalized away from a unanimous ``"The Cat"`` scores
    0. When the human answers differ, the prediction is normalized again and each human
    answer is normalized (words, then punctuation) before comparing.
    """
    if prediction is None:
        return 0.0
    candidate = normalize_vqa_answer(prediction)
    references = [_clean_spaces(answer) for answer in answers]
    if len(set(references)) > 1:
        candidate = normalize_words(strip_punctuation(candidate))
        references = [strip_punctuation(normalize_words(answer)) for answer in references]
    matches = sum(reference == candidate for reference in references)
    return min(1.0, matches / MATCHES_FOR_FULL_SCORE)
