"""Validation of the JSON values the service receives, with errors naming the field.

Skill requests are validated by the API's own request models (``api.models``), exactly
as the client validates them; the fields newer than the spec (``reasoning``,
``spatial_refs``), ranks, names, learning rates, train groups and the training metadata
of rollouts passed back are checked here. Every check raises ``ServiceError`` (422, or
400 for an unreadable image) with a message that starts with the field's path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from lightning_moondream.api.limits import (
    DEFAULT_MAX_OBJECTS,
    DEFAULT_MAX_TOKENS,
    MAX_SPATIAL_REFS,
)
from lightning_moondream.api.models import (
    AnyRequest,
    GroundTruth,
    check_num_rollouts,
    parse_ground_truth,
    parse_request,
    validation_message,
)
from lightning_moondream.server.errors import ServiceError

BodyT = TypeVar("BodyT", bound=BaseModel)

_EXTENSIONS = ("reasoning", "spatial_refs")
"""Request fields newer than the spec, validated by the service itself."""

GROUP_FIELDS = {
    "rl": {"mode", "request", "rollouts", "rewards"},
    "sft": {"mode", "request", "target"},
}
"""The fields a train group of each mode may have."""

FINETUNE_NAME = re.compile(r"[A-Za-z0-9._-]+")
"""A ``/finetunes`` name: letters, digits, dots, hyphens and underscores."""


@dataclass(frozen=True)
class ParsedRequest:
    """A validated skill request.

    Attributes:
        request: The spec's fields as the API's request model.
        reasoning: Whether a query asked for its reasoning.
        spatial_refs: Normalized ``(x, y)`` points and ``(x_min, y_min, x_max, y_max)``
            boxes the request refers to.
    """

    request: AnyRequest
    reasoning: bool = False
    spatial_refs: tuple[tuple[float, ...], ...] = ()

    @property
    def skill(self) -> str:
        """The request's skill."""
        return self.request.skill

    @property
    def max_tokens(self) -> int:
        """The request's ``max_tokens``, else the API's default for its skill."""
        settings = self.request.settings
        if settings is not None and "max_tokens" in settings.model_fields_set:
            return settings.max_tokens
        return DEFAULT_MAX_TOKENS[self.skill]

    @property
    def max_objects(self) -> int | None:
        """A detect request's ``max_objects``, else the API's default (``None`` otherwise)."""
        settings = self.request.settings
        if settings is not None and settings.max_objects is not None:
            return settings.max_objects
        return DEFAULT_MAX_OBJECTS if self.skill == "detect" else None

    def anchors(self) -> list[tuple[float, float]]:
        """The center of each spatial ref."""
        return [
            (ref[0], ref[1]) if len(ref) == 2 else ((ref[0] + ref[2]) / 2, (ref[1] + ref[3]) / 2)
            for ref in self.spatial_refs
        ]


def is_finite_number(value: Any) -> bool:
    """Whether a JSON value is a finite number (``true`` and ``false`` are not numbers)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_body(body: dict[str, Any], model: type[BodyT]) -> BodyT:
    """A JSON body validated as ``model``.

    Raises:
        ServiceError: 422 naming a bad field.
    """
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ServiceError(422, validation_message(exc, "")) from exc


def check_rank(rank: int, ranks: Collection[int]) -> int:
    """Validate a LoRA rank against the ranks a dialect accepts.

    Raises:
        ServiceError: 422 naming ``rank``.
    """
    if isinstance(rank, bool) or rank not in ranks:
        allowed = ", ".join(str(value) for value in ranks)
        raise ServiceError(422, f"rank: must be one of {allowed}, got {rank!r}")
    return rank


def check_finetune_name(name: str) -> str:
    """Validate a finetune's name: letters, digits, dots, hyphens and underscores.

    Raises:
        ServiceError: 422 naming ``name``.
    """
    if not FINETUNE_NAME.fullmatch(name):
        raise ServiceError(
            422, f"name: only letters, digits, dots, hyphens and underscores, got {name!r}"
        )
    return name


def check_rollout_count(num_rollouts: int) -> int:
    """Validate ``num_rollouts`` as the client does.

    Raises:
        ServiceError: 422 naming ``num_rollouts``.
    """
    try:
        return check_num_rollouts(num_rollouts)
    except ValueError as exc:
        raise ServiceError(422, f"num_rollouts: {exc}") from exc


def check_lr(value: Any) -> float | None:
    """Validate a train step's learning rate: absent, or a finite number >= 0.

    Raises:
        ServiceError: 422 naming ``lr``.
    """
    if value is None:
        return None
    if not is_finite_number(value) or value < 0:
        raise ServiceError(422, f"lr: must be a finite number >= 0, got {value!r}")
    return float(value)


def check_step(raw: str) -> int:
    """Validate a train step number given in a path.

    Raises:
        ServiceError: 422 naming ``step``.
    """
    if not raw.isdigit():
        raise ServiceError(422, f"step: must be a non-negative integer, got {raw!r}")
    return int(raw)


def check_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Validate logged metrics: names of 1 to 256 characters, finite values.

    Raises:
        ServiceError: 422 naming ``metrics`` or the metric.
    """
    checked = {}
    for name, value in metrics.items():
        if not name.strip() or len(name) > 256:
            raise ServiceError(422, f"metrics: names must be 1 to 256 characters, got {name!r}")
        if not is_finite_number(value):
            raise ServiceError(422, f"metrics.{name}: must be a finite number, got {value!r}")
        checked[name] = float(value)
    return checked


def parse_skill_request(raw: Any, where: str, max_pixels: int) -> ParsedRequest:
    """Validate a skill request exactly as the client does, image included.

    ``reasoning`` and ``spatial_refs`` are validated here, the rest by the API's
    request models.

    Raises:
        ServiceError: 400 for an unreadable image, 422 for any other invalid field.
    """
    if not isinstance(raw, dict):
        raise ServiceError(422, f"{where}: must be an object")
    base = {key: value for key, value in raw.items() if key not in _EXTENSIONS}
    try:
        request = parse_request(base, wire=True, max_pixels=max_pixels)
    except ValidationError as exc:
        # An image that is there but unreadable is a bad payload (400), not a bad field.
        unreadable_image = all(
            item["loc"][-1:] == ("image_url",) and item["type"] == "value_error"
            for item in exc.errors()
        )
        raise ServiceError(
            400 if unreadable_image else 422, validation_message(exc, where)
        ) from exc
    reasoning = raw.get("reasoning", False)
    if not isinstance(reasoning, bool):
        raise ServiceError(422, f"{where}.reasoning: must be true or false")
    if reasoning and request.skill != "query":
        raise ServiceError(422, f"{where}.reasoning: only valid for query, not {request.skill}")
    refs = spatial_refs(raw.get("spatial_refs"), f"{where}.spatial_refs")
    return ParsedRequest(request, reasoning, refs)


def spatial_refs(value: Any, where: str) -> tuple[tuple[float, ...], ...]:
    """Validate ``spatial_refs``: points ``[x, y]`` or boxes ``[x1, y1, x2, y2]`` in [0, 1].

    Raises:
        ServiceError: 422 naming the ref that is wrong.
    """
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_SPATIAL_REFS:
        raise ServiceError(
            422,
            f"{where}: must be a list of at most {MAX_SPATIAL_REFS} [x, y] points or "
            "[x_min, y_min, x_max, y_max] boxes",
        )
    refs = []
    for index, ref in enumerate(value):
        if (
            not isinstance(ref, list)
            or len(ref) not in (2, 4)
            or not all(is_finite_number(number) and 0.0 <= number <= 1.0 for number in ref)
        ):
            raise ServiceError(
                422, f"{where}[{index}]: must be 2 or 4 numbers in [0, 1], got {ref!r}"
            )
        if len(ref) == 4 and not (ref[0] < ref[2] and ref[1] < ref[3]):
            raise ServiceError(
                422, f"{where}[{index}]: a box needs x_min < x_max and y_min < y_max, got {ref!r}"
            )
        refs.append(tuple(float(number) for number in ref))
    return tuple(refs)


def check_ground_truth(skill: str, raw: dict[str, Any] | None) -> GroundTruth | None:
    """Validate a ``/rollouts`` body's ground truth for the request's skill.

    Raises:
        ServiceError: 422 naming the ground truth field that is wrong.
    """
    try:
        return parse_ground_truth(skill, raw)
    except ValidationError as exc:
        raise ServiceError(422, validation_message(exc, "ground_truth")) from exc
    except ValueError as exc:
        raise ServiceError(422, f"ground_truth: {exc}") from exc


def group_mode(group: Any, where: str) -> str:
    """The mode of a train group, checked with the group's fields.

    Raises:
        ServiceError: 422 for a group that is not an object, an unknown mode, or a
            field the mode does not have.
    """
    if not isinstance(group, dict):
        raise ServiceError(422, f"{where}: must be an rl or sft group object")
    mode = group.get("mode", "rl")
    # A tuple, not the dict: an unhashable mode must be refused, not raise.
    if mode not in ("rl", "sft"):
        raise ServiceError(422, f"{where}.mode: must be 'rl' or 'sft', got {mode!r}")
    unknown = sorted(set(group) - GROUP_FIELDS[mode])
    if unknown:
        raise ServiceError(
            422, f"{where}: field(s) {', '.join(unknown)} not valid in an {mode} group"
        )
    return str(mode)


def rollout_fields(rollout: Any, where: str) -> tuple[list[int], list[float], str]:
    """The training metadata of a rollout passed back to ``/train_step``.

    Raises:
        ServiceError: 422 if it is missing or malformed.
    """
    if not isinstance(rollout, dict):
        raise ServiceError(422, f"{where}: must be the rollout object as received")
    tokens, logprobs, signature = (
        rollout.get("answer_tokens"),
        rollout.get("logprobs"),
        rollout.get("signature"),
    )
    if (
        not isinstance(tokens, list)
        or not all(isinstance(token, int) and not isinstance(token, bool) for token in tokens)
        or not isinstance(logprobs, list)
        or not all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in logprobs
        )
        or len(tokens) != len(logprobs)
        or not tokens
        or not isinstance(signature, str)
    ):
        raise ServiceError(
            422,
            f"{where}: training metadata (answer_tokens, logprobs, signature) missing or malformed; "
            "pass rollouts back exactly as received",
        )
    return tokens, [float(value) for value in logprobs], signature
