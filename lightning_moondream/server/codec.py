"""Token vocabularies of the reference policy, and tokens to and from the spec's JSON.

Points and boxes are sequences of discrete coordinate tokens: ``COORD_BINS`` bins
spanning [0, 1] (bin ``i`` is the value ``i / (COORD_BINS - 1)``) plus an end token. A
point is two tokens ``x, y``; a box four, ``x_min, y_min, x_max, y_max``. Short answers
are words of ``ANSWER_VOCAB`` followed by an end token.

Prompts are hashed words: lower-cased alphanumeric runs, each mapped by CRC-32 to one of
``PROMPT_BUCKETS`` embeddings. CRC-32 is fixed across processes and platforms (unlike
Python's ``hash``), so the same prompt always reaches the same embeddings.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

from lightning_moondream.data.synthetic import COLORS, SHAPES

COORD_BINS = 32
COORD_END = COORD_BINS
"""Index of the end token in the coordinate vocabulary (after the bins)."""
COORD_VOCAB = COORD_BINS + 1
TOKENS_PER_OBJECT = {"point": 2, "detect": 4}

ANSWER_END = 0
ANSWER_VOCAB: tuple[str, ...] = (
    "<end>",
    *(str(number) for number in range(10)),
    *COLORS,
    *SHAPES,
    "yes",
    "no",
)
MAX_ANSWER_TOKENS = 4
"""Longest answer in words; every answer of the synthetic questions is one word."""

PROMPT_BUCKETS = 512
_WORD = re.compile(r"[a-z0-9]+")


def prompt_buckets(text: str) -> list[int]:
    """Hash the words of a prompt to embedding buckets (empty for a prompt without words)."""
    return [zlib.crc32(word.encode()) % PROMPT_BUCKETS for word in _WORD.findall(text.lower())]


def to_bin(value: float) -> int:
    """Nearest coordinate bin of a normalized value."""
    return min(COORD_BINS - 1, max(0, round(value * (COORD_BINS - 1))))


def from_bin(index: int) -> float:
    """Normalized value of a coordinate bin."""
    return index / (COORD_BINS - 1)


def encode_points(points: Sequence[tuple[float, float]]) -> list[int]:
    """Token sequence of points, end token included."""
    return [token for x, y in points for token in (to_bin(x), to_bin(y))] + [COORD_END]


def encode_boxes(boxes: Sequence[tuple[float, float, float, float]]) -> list[int]:
    """Token sequence of boxes, end token included.

    Each maximum lands at least one bin above its minimum, the same rule sampling obeys.
    """
    tokens = []
    for x_min, y_min, x_max, y_max in boxes:
        low_x, low_y = min(to_bin(x_min), COORD_BINS - 2), min(to_bin(y_min), COORD_BINS - 2)
        tokens += [low_x, low_y, max(to_bin(x_max), low_x + 1), max(to_bin(y_max), low_y + 1)]
    return [*tokens, COORD_END]


def encode_answer(answer: str) -> list[int]:
    """Token sequence of an answer, end token included.

    Raises:
        ValueError: If a word is outside ``ANSWER_VOCAB`` or the answer is too long.
    """
    words = answer.lower().split()
    unknown = [word for word in words if word not in ANSWER_VOCAB]
    if unknown or not words or len(words) > MAX_ANSWER_TOKENS:
        raise ValueError(f"answer {answer!r} cannot be expressed in the answer vocabulary")
    return [ANSWER_VOCAB.index(word) for word in words] + [ANSWER_END]


def decode(skill: str, tokens: Sequence[int]) -> dict[str, Any]:
    """Turn a sampled token sequence into the spec's output JSON.

    Tokens after the end token are ignored, as is a trailing object cut short by
    ``max_tokens``.
    """
    if skill == "query":
        words = []
        for token in tokens:
            if token == ANSWER_END:
                break
            words.append(ANSWER_VOCAB[token])
        return {"answer": " ".join(words)}
    per_object = TOKENS_PER_OBJECT[skill]
    coords = coordinates(skill, tokens)
    whole = len(coords) - len(coords) % per_object
    if skill == "point":
        return {"points": [{"x": coords[i], "y": coords[i + 1]} for i in range(0, whole, 2)]}
    return {
        "boxes": [
            {
                "x_min": coords[i],
                "y_min": coords[i + 1],
                "x_max": coords[i + 2],
                "y_max": coords[i + 3],
            }
            for i in range(0, whole, 4)
        ]
    }


def coordinates(skill: str, tokens: Sequence[int]) -> list[float]:
    """Normalized coordinates of a point or detect token sequence (empty for query)."""
    values = []
    if skill != "query":
        for token in tokens:
            if token == COORD_END:
                break
            values.append(from_bin(token))
    return values


REASONING_VOCAB: tuple[str, ...] = (
    "looking",
    "at",
    "the",
    "image",
    "marked",
    "region",
    "answer",
    "is",
    *ANSWER_VOCAB[1:],
)
"""Words of the reference policy's reasoning: its template's, then the answer words."""
_REGION_PHRASE = "the marked region"


def reasoning(answer: str, anchors: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """The reasoning of a query answer: a sentence built from it, and its tokens.

    The sentence looks at the marked region when the request gave spatial refs, and
    grounds that phrase at their centers (``anchors``); otherwise at the whole image.

    Returns:
        ``{"text", "grounding", "tokens"}``: ``tokens`` index ``REASONING_VOCAB``, one
        per word of ``text``.
    """
    subject = _REGION_PHRASE if anchors else "the image"
    text = f"Looking at {subject}, the answer is {answer}."
    grounding = []
    if anchors:
        start = text.index(_REGION_PHRASE)
        grounding.append(
            {
                "start_idx": start,
                "end_idx": start + len(_REGION_PHRASE),
                "points": [[x, y] for x, y in anchors],
            }
        )
    tokens = [REASONING_VOCAB.index(word) for word in _WORD.findall(text.lower())]
    return {"text": text, "grounding": grounding, "tokens": tokens}
