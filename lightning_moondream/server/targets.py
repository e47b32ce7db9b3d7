"""SFT targets of ``/train_step``: validated, and turned into the policy's tokens.

A target is the answer a request should get: ``{"answer", "reasoning"?}`` for query,
``{"points"}`` or ``{"boxes"}`` for point (a box stands for its center), ``{"boxes"}``
for detect. Its tokens must be a sequence the policy could have sampled under the
request's decoding rules, so that its likelihood is well defined.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from lightning_moondream.api.models import (
    DetectGroundTruth,
    PointGroundTruth,
    parse_ground_truth,
    validation_message,
)
from lightning_moondream.server import codec
from lightning_moondream.server.policy import Decoding

_QUERY_FIELDS = {"answer", "reasoning"}


def _query_tokens(target: dict[str, Any]) -> list[int]:
    unknown = sorted(set(target) - _QUERY_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} for a query target")
    answer = target.get("answer")
    if not isinstance(answer, str):
        raise ValueError("answer: a query target needs the answer as a string")
    reasoning = target.get("reasoning")
    # The reference policy derives its reasoning from the answer: it is checked, not learned.
    if reasoning is not None and (
        not isinstance(reasoning, dict) or not isinstance(reasoning.get("text"), str)
    ):
        raise ValueError("reasoning: must be an object with a text string")
    return codec.encode_answer(answer)


def target_tokens(skill: str, target: Any, rules: Decoding) -> list[int]:
    """The token sequence of a request's target, end token included.

    Args:
        skill: The request's skill.
        target: The target JSON.
        rules: The request's decoding rules.

    Raises:
        ValueError: Naming what is wrong: a field of another skill's target, a value
            out of range, an answer outside the vocabulary, or more objects or tokens
            than the request allows.
    """
    if not isinstance(target, dict):
        raise ValueError("must be an object")
    if skill == "query":
        tokens = _query_tokens(target)
    else:
        try:
            truth = parse_ground_truth(skill, target)
        except ValidationError as exc:
            raise ValueError(validation_message(exc)) from exc
        if isinstance(truth, PointGroundTruth):
            points = (
                [(point.x, point.y) for point in truth.points]
                if truth.points is not None
                else [
                    ((box.x_min + box.x_max) / 2, (box.y_min + box.y_max) / 2)
                    for box in truth.boxes or []
                ]
            )
            objects = len(points)
            tokens = codec.encode_points(points)
        else:
            assert isinstance(truth, DetectGroundTruth)
            objects = len(truth.boxes)
            tokens = codec.encode_boxes([box.as_tuple() for box in truth.boxes])
        if objects > rules.max_objects:
            raise ValueError(
                f"{objects} objects, more than the request's {rules.max_objects} at most"
            )
    if len(tokens) > rules.max_len:
        raise ValueError(
            f"{len(tokens)} tokens, more than the request's settings allow ({rules.max_len})"
        )
    return tokens
