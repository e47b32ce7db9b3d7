"""Typed models of the tuning API's JSON, validated before anything is sent.

Requests and ground truth are pydantic models; everywhere one is taken, the spec's own
JSON (a plain dict) is accepted too and validated the same way. The local service
validates what it receives with these same models (``context={"wire": True}``), so the
client and the service enforce one set of rules.

Responses keep the server's raw JSON: a rollout's fields other than ``output`` are
opaque training metadata that must go back to ``/train_step`` exactly as received.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal, TypedDict

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lightning_moondream.api.limits import (
    ADAPTER_RANKS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    FINETUNE_RANKS,
    MAX_ROLLOUTS,
    MAX_SPATIAL_REFS,
    MIN_ROLLOUTS,
)
from lightning_moondream.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    check_data_url,
    encode_image,
    is_data_url,
)

DIALECT_RANKS: Mapping[str, tuple[int, ...]] = {
    "adapters": ADAPTER_RANKS,
    "finetunes": FINETUNE_RANKS,
}
"""LoRA ranks each wire dialect accepts."""
Skill = Literal["query", "point", "detect"]
SKILLS: tuple[Skill, ...] = ("query", "point", "detect")

_STRICT = ConfigDict(extra="forbid", frozen=True)
_Unit = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


def _is_wire(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("wire"))


class Point(BaseModel):
    """A point in normalized image coordinates."""

    model_config = _STRICT
    x: _Unit
    y: _Unit


class Box(BaseModel):
    """A box in normalized image coordinates, ``x_min < x_max`` and ``y_min < y_max``."""

    model_config = _STRICT
    x_min: _Unit
    y_min: _Unit
    x_max: _Unit
    y_max: _Unit

    @model_validator(mode="after")
    def _ordered(self) -> Box:
        if not self.x_min < self.x_max:
            raise ValueError(f"x_min ({self.x_min}) must be less than x_max ({self.x_max})")
        if not self.y_min < self.y_max:
            raise ValueError(f"y_min ({self.y_min}) must be less than y_max ({self.y_max})")
        return self

    def as_tuple(self) -> tuple[float, float, float, float]:
        """Return ``(x_min, y_min, x_max, y_max)``."""
        return (self.x_min, self.y_min, self.x_max, self.y_max)


class Settings(BaseModel):
    """Generation settings; ``max_objects`` is valid for detect only.

    Only the fields given are sent: the service's own defaults apply to the others
    (``limits``: ``max_tokens`` 256 for detect, 128 otherwise; ``max_objects`` 50). A
    request reads its skill's ``max_tokens`` when none is given.
    """

    model_config = _STRICT
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(DEFAULT_TOP_P, gt=0.0, le=1.0, allow_inf_nan=False)
    max_tokens: int = Field(DEFAULT_MAX_TOKENS["query"], ge=1, le=4096)
    max_objects: int | None = Field(None, ge=1, le=100)

    def for_skill(self, skill: str) -> Settings:
        """These settings with the skill's default ``max_tokens`` where none was given.

        The copy keeps which fields were given, so it still sends only those.
        """
        default = DEFAULT_MAX_TOKENS[skill]
        if "max_tokens" in self.model_fields_set or self.max_tokens == default:
            return self
        values = {**self.__dict__, "max_tokens": default}
        return Settings.model_construct(_fields_set=set(self.model_fields_set), **values)

    def to_json(self) -> dict[str, Any]:
        """The fields given, as the spec's JSON."""
        return self.model_dump(mode="json", exclude_unset=True, exclude_none=True)


def check_spatial_ref(ref: Any) -> list[float]:
    """Return a spatial reference if valid: a point ``[x, y]`` or a box ``[x1, y1, x2, y2]``.

    Coordinates are normalized to 0-1; a box must have ``x1 < x2`` and ``y1 < y2``.

    Raises:
        ValueError: Saying what is wrong with the reference.
    """
    if isinstance(ref, (str, bytes, Mapping)) or not isinstance(ref, Sequence):
        raise ValueError(f"must be a list of 2 or 4 numbers, got {ref!r}")
    if len(ref) not in (2, 4):
        raise ValueError(f"must hold 2 numbers (a point) or 4 (a box), got {len(ref)}")
    values = []
    for value in ref:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"coordinates must be numbers, got {value!r}")
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"coordinates must be finite and within 0 to 1, got {value!r}")
        values.append(float(value))
    if len(values) == 4 and not (values[0] < values[2] and values[1] < values[3]):
        raise ValueError(f"a box must have x1 < x2 and y1 < y2, got {values}")
    return values


class _RequestBase(BaseModel):
    model_config = _STRICT
    settings: Settings | None = None
    spatial_refs: list[list[float]] | None = Field(None, max_length=MAX_SPATIAL_REFS)
    """Points ``[x, y]`` or boxes ``[x1, y1, x2, y2]`` (0-1) the request refers to."""

    @field_validator("spatial_refs", mode="before")
    @classmethod
    def _check_spatial_refs(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise ValueError("must be a list of points [x, y] or boxes [x1, y1, x2, y2]")
        checked = []
        for index, ref in enumerate(value):
            try:
                checked.append(check_spatial_ref(ref))
            except ValueError as exc:
                raise ValueError(f"spatial_refs[{index}] {exc}") from exc
        return checked

    @field_validator("settings", mode="after")
    @classmethod
    def _skill_defaults(cls, settings: Settings | None) -> Settings | None:
        skill = cls.model_fields["skill"].default if "skill" in cls.model_fields else None
        if settings is None or skill is None:
            return settings
        return settings.for_skill(skill)

    @field_validator("image_url", mode="before", check_fields=False)
    @classmethod
    def _encode_image(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        if _is_wire(info):
            # A server never opens paths or fetches URLs: only inline data is accepted,
            # within the pixel limit. The header is enough here; pixels decode once, later.
            if not isinstance(value, str) or not is_data_url(value):
                raise ValueError("must be a base64 data URL (data:image/...;base64,...)")
            context = info.context or {}
            try:
                check_data_url(value, max_pixels=context.get("max_pixels", DEFAULT_MAX_PIXELS))
            except ImageError as exc:
                raise ValueError(str(exc)) from exc
            return value
        try:
            return encode_image(value)
        except ImageError as exc:
            raise ValueError(str(exc)) from exc

    @model_validator(mode="after")
    def _max_objects_for_detect_only(self) -> _RequestBase:
        skill = getattr(self, "skill", None)
        if (
            skill != "detect"
            and self.settings is not None
            and self.settings.max_objects is not None
        ):
            raise ValueError(f"settings.max_objects is only valid for detect, not {skill}")
        return self

    def to_json(self) -> dict[str, Any]:
        """Return the request as the spec's JSON, omitting unset optional fields.

        Of the settings, only those given are sent, so the service's defaults apply to
        the others (a default of one skill is never sent for another).
        """
        data = self.model_dump(mode="json", exclude_none=True, exclude={"settings"})
        if self.settings is not None and (settings := self.settings.to_json()):
            data["settings"] = settings
        return data


class QueryRequest(_RequestBase):
    """Ask a question, optionally about an image."""

    skill: Literal["query"] = "query"
    question: str = Field(min_length=1, max_length=4096)
    image_url: str | None = None
    reasoning: bool | None = None
    """Ask for the reasoning behind the answer (the ``/finetunes`` dialect carries it)."""


class PointRequest(_RequestBase):
    """Point at every instance of an object in an image."""

    skill: Literal["point"] = "point"
    object: str = Field(min_length=1, max_length=1024)
    image_url: str


class DetectRequest(_RequestBase):
    """Detect every instance of an object in an image, as boxes."""

    skill: Literal["detect"] = "detect"
    object: str = Field(min_length=1, max_length=1024)
    image_url: str


SkillRequest = Annotated[QueryRequest | PointRequest | DetectRequest, Field(discriminator="skill")]
_request_adapter: TypeAdapter[QueryRequest | PointRequest | DetectRequest] = TypeAdapter(
    SkillRequest
)

AnyRequest = QueryRequest | PointRequest | DetectRequest
"""A typed request of any skill."""


class PointGroundTruth(BaseModel):
    """Ground truth for point: true points, or boxes that a point must fall in."""

    model_config = _STRICT
    points: list[Point] | None = Field(None, max_length=1000)
    boxes: list[Box] | None = Field(None, max_length=1000)

    @model_validator(mode="after")
    def _one_kind(self) -> PointGroundTruth:
        if (self.points is None) == (self.boxes is None):
            raise ValueError("point ground truth needs exactly one of 'points' or 'boxes'")
        return self


class DetectGroundTruth(BaseModel):
    """Ground truth for detect: the true boxes (possibly none)."""

    model_config = _STRICT
    boxes: list[Box] = Field(max_length=1000)


GroundTruth = PointGroundTruth | DetectGroundTruth


def parse_request(
    request: AnyRequest | Mapping[str, Any],
    *,
    wire: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> AnyRequest:
    """Validate a request given as a typed model or as the spec's JSON.

    Args:
        request: A ``QueryRequest``/``PointRequest``/``DetectRequest`` or a dict.
        wire: Validate as a server does: ``image_url`` must be an inline data URL.
        max_pixels: With ``wire``, refuse images larger than this many pixels.

    Raises:
        pydantic.ValidationError: Naming the field that is wrong.
    """
    if isinstance(request, (QueryRequest, PointRequest, DetectRequest)):
        return request
    if not isinstance(request, Mapping):
        raise TypeError(f"request must be a request model or a dict, got {type(request).__name__}")
    context = {"wire": wire, "max_pixels": max_pixels}
    return _request_adapter.validate_python(dict(request), context=context)


def parse_ground_truth(
    skill: str, ground_truth: GroundTruth | Mapping[str, Any] | None
) -> GroundTruth | None:
    """Validate ground truth for a skill; query takes none.

    Raises:
        ValueError: If ground truth is given for query.
        pydantic.ValidationError: Naming the field that is wrong.
    """
    if ground_truth is None:
        return None
    if skill == "query":
        raise ValueError("ground_truth is only accepted for point and detect, not query")
    model = PointGroundTruth if skill == "point" else DetectGroundTruth
    if isinstance(ground_truth, model):
        return ground_truth
    if isinstance(ground_truth, BaseModel):
        raise ValueError(f"{type(ground_truth).__name__} is not ground truth for {skill}")
    if not isinstance(ground_truth, Mapping):
        raise TypeError(
            f"ground_truth must be a model or a dict, got {type(ground_truth).__name__}"
        )
    return model.model_validate(dict(ground_truth))


def check_rank(rank: int, dialect: str = "adapters") -> int:
    """Return ``rank`` if the dialect accepts it.

    Args:
        rank: The LoRA rank.
        dialect: ``"adapters"`` (16 or 32) or ``"finetunes"`` (8, 16, 24 or 32).

    Raises:
        ValueError: Naming the dialect and the ranks it accepts.
    """
    allowed = DIALECT_RANKS[dialect]
    if isinstance(rank, bool) or rank not in allowed:
        choices = ", ".join(str(value) for value in allowed[:-1]) + f" or {allowed[-1]}"
        raise ValueError(f"rank must be {choices} on the /{dialect} dialect, got {rank!r}")
    return rank


def check_num_rollouts(num_rollouts: int) -> int:
    """Return ``num_rollouts`` if within 1 to 16, else raise ``ValueError``."""
    if (
        isinstance(num_rollouts, bool)
        or not isinstance(num_rollouts, int)
        or not (MIN_ROLLOUTS <= num_rollouts <= MAX_ROLLOUTS)
    ):
        raise ValueError(
            f"num_rollouts must be an integer from {MIN_ROLLOUTS} to {MAX_ROLLOUTS}, "
            f"got {num_rollouts!r}"
        )
    return num_rollouts


def validation_message(error: ValidationError, prefix: str = "") -> str:
    """Flatten a pydantic error into one part per field, e.g. ``request.object: ...``.

    The skill tag that pydantic puts in the path of a discriminated union is left out,
    so the path names the field as it appears in the JSON.

    Args:
        error: The validation error.
        prefix: Prepended to every location, e.g. ``"request"``.
    """
    parts = []
    for item in error.errors(include_url=False):
        location = [str(part) for part in item["loc"]]
        if location and location[0] in SKILLS:
            location = location[1:]
        where = ".".join([prefix, *location] if prefix else location) or "body"
        parts.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


# Responses ---------------------------------------------------------------------------


class Adapter(BaseModel):
    """An adapter as the server describes it; unknown fields are kept."""

    model_config = ConfigDict(extra="allow")
    adapter_id: str
    name: str
    rank: int
    created_at: datetime | str | None = None
    created_at_ms: int | None = None
    train_steps: int | None = None
    """Train steps applied so far, where the server reports it (the local service does)."""

    def created_after(self, started: datetime) -> bool:
        """Tell whether the server says this adapter was made at or after ``started``."""
        return _created_after(self.created_at, self.created_at_ms, started)

    @classmethod
    def from_finetune(cls, data: Any) -> Adapter:
        """Read a finetune of the ``/finetunes`` dialect, wrapped in ``finetune`` or not."""
        if isinstance(data, Mapping) and isinstance(data.get("finetune"), Mapping):
            data = data["finetune"]
        if not isinstance(data, Mapping) or "finetune_id" not in data:
            raise ValueError("the answer holds no finetune object with a finetune_id")
        return cls.model_validate({"adapter_id": data["finetune_id"], **data})


FINETUNE_MODEL = "moondream3-preview"
"""The base model of ``/finetunes`` inference ids: ``moondream3-preview/{finetune_id}@{step}``."""


def inference_model_id(ref: str) -> str | None:
    """The inference model of a checkpoint ref, or ``None`` for an ``/adapters`` one.

    A ``/finetunes`` checkpoint ``finetune_id@step`` is served as
    ``moondream3-preview/finetune_id@step``.
    """
    return f"{FINETUNE_MODEL}/{ref}" if "@" in ref else None


class Checkpoint(BaseModel):
    """A saved adapter state, from either dialect.

    In the ``/adapters`` dialect ``checkpoint_id`` is ``adapter_id/chk_id``; in the
    ``/finetunes`` dialect a checkpoint belongs to ``finetune_id`` and is named by its
    ``step``. ``ref`` is the one string that names it in both (``checkpoints.delete``).
    """

    model_config = ConfigDict(extra="allow")
    checkpoint_id: str
    created_at: datetime | str | None = None
    finetune_id: str | None = None
    step: int | None = None
    expires_at_ms: int | None = None
    created_at_ms: int | None = None

    @property
    def adapter_id(self) -> str:
        """The adapter (or finetune) this checkpoint belongs to."""
        if self.finetune_id is not None:
            return self.finetune_id
        return split_checkpoint_id(self.checkpoint_id)[0]

    @property
    def ref(self) -> str:
        """``adapter_id/chk_id`` (``/adapters``) or ``finetune_id@step`` (``/finetunes``)."""
        if self.finetune_id is not None and self.step is not None:
            return f"{self.finetune_id}@{self.step}"
        return self.checkpoint_id

    @property
    def model_id(self) -> str | None:
        """The inference model id of a ``/finetunes`` checkpoint, else ``None``."""
        return inference_model_id(self.ref)

    def created_after(self, started: datetime) -> bool:
        """Tell whether the server says this checkpoint was made at or after ``started``."""
        return _created_after(self.created_at, self.created_at_ms, started)


class TrainStepResult(BaseModel):
    """What the server said about a train step; ``None`` where it said nothing."""

    model_config = ConfigDict(extra="allow")
    step: int | None = None
    applied: bool | None = None
    kl: float | None = None
    router_kl: float | None = None
    grad_norm: float | None = None
    sft_loss: float | None = None
    reward_mean: float | None = None
    reward_std: float | None = None


def _created_after(
    created_at: datetime | str | None, created_at_ms: int | None, started: datetime
) -> bool:
    if created_at_ms is not None:
        return created_at_ms >= started.timestamp() * 1000
    if isinstance(created_at, str):
        try:
            created_at = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
        except ValueError:
            return False
    if not isinstance(created_at, datetime):
        return False
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=started.tzinfo)
    return created_at >= started


def split_checkpoint_ref(ref: str) -> tuple[str, str | int]:
    """Split a checkpoint reference: ``adapter_id/chk_id`` or ``finetune_id@step``.

    Returns:
        ``(adapter_id, chk_id)`` or ``(finetune_id, step)``.

    Raises:
        ValueError: If the reference has neither form.
    """
    if isinstance(ref, str) and "/" not in ref and "@" in ref:
        finetune_id, _, step = ref.rpartition("@")
        if finetune_id and step.isdigit():
            return finetune_id, int(step)
        raise ValueError(f"checkpoint ref must look like 'finetune_id@step', got {ref!r}")
    if not isinstance(ref, str):
        raise ValueError(f"checkpoint ref must be a string, got {ref!r}")
    return split_checkpoint_id(ref)


class Page(BaseModel):
    """One page of a list: ``items`` and the cursor of the next page, if any."""

    items: list[Any]
    next_cursor: str | None = None


class AdapterPage(Page):
    """One page of adapters."""

    items: list[Adapter]


class CheckpointPage(Page):
    """One page of checkpoints."""

    items: list[Checkpoint]


def split_checkpoint_id(checkpoint_id: str) -> tuple[str, str]:
    """Split ``adapter_id/chk_id`` into its two parts.

    Raises:
        ValueError: If the id does not have exactly that form.
    """
    adapter_id, sep, short = checkpoint_id.partition("/")
    if not sep or not adapter_id or not short or "/" in short:
        raise ValueError(
            f"checkpoint id must look like 'adapter_id/checkpoint_id', got {checkpoint_id!r}"
        )
    return adapter_id, short


class Rollout:
    """One sampled attempt, wrapping the server's JSON without changing it.

    Attributes:
        raw: The rollout exactly as received; this is what goes back to ``/train_step``.
    """

    __slots__ = ("raw",)

    def __init__(self, raw: dict[str, Any]) -> None:
        if not isinstance(raw, dict):
            raise ValueError(f"a rollout must be a JSON object, got {type(raw).__name__}")
        self.raw = raw

    @property
    def skill(self) -> str | None:
        """The skill this rollout answers."""
        return self.raw.get("skill")

    @property
    def output(self) -> dict[str, Any]:
        """The decoded output: ``answer``, ``points`` or ``boxes``.

        The ``/finetunes`` wire names a detect rollout's boxes ``objects``; this view names
        them ``boxes`` in both dialects, so rewards and metrics read one shape. ``raw``
        keeps the wire's own names for ``/train_step``.
        """
        output = self.raw.get("output")
        if not isinstance(output, dict):
            return {}
        if "boxes" not in output and "objects" in output:
            return {
                **{k: v for k, v in output.items() if k != "objects"},
                "boxes": output["objects"],
            }
        return output

    @property
    def answer(self) -> str | None:
        """The answer of a query rollout."""
        answer = self.output.get("answer")
        return answer if isinstance(answer, str) else None

    @property
    def points(self) -> list[Point]:
        """The points of a point rollout (empty for other skills)."""
        return [Point.model_validate(point) for point in self.output.get("points") or []]

    @property
    def boxes(self) -> list[Box]:
        """The boxes of a detect rollout: ``boxes``, or ``objects`` in the ``/finetunes`` wire."""
        return [Box.model_validate(box) for box in self.output.get("boxes") or []]

    @property
    def reasoning(self) -> dict[str, Any] | None:
        """The reasoning ``{text, grounding}`` of a query asked with ``reasoning``."""
        reasoning = self.output.get("reasoning")
        return reasoning if isinstance(reasoning, dict) else None

    def __repr__(self) -> str:
        return f"Rollout(skill={self.skill!r}, output={self.output!r})"


class TrainGroup(TypedDict):
    """One group of ``/train_step``: the echoed request, its rollouts, one reward each."""

    request: dict[str, Any]
    rollouts: list[dict[str, Any]]
    rewards: list[float]


class RolloutsResponse:
    """The answer of ``/rollouts``, keeping the server's JSON for ``/train_step``.

    Attributes:
        raw: The response exactly as received.
        request: The echoed request JSON.
        rollouts: The rollouts, each wrapping its raw JSON.
        rewards: Server rewards when ground truth was given, else ``None``.
    """

    __slots__ = ("raw", "request", "rewards", "rollouts")

    def __init__(self, raw: dict[str, Any]) -> None:
        if not isinstance(raw, dict):
            raise ValueError("the /rollouts response must be a JSON object")
        request = raw.get("request")
        rollouts = raw.get("rollouts")
        rewards = raw.get("rewards")
        if not isinstance(request, dict):
            raise ValueError("the /rollouts response has no 'request' object")
        if not isinstance(rollouts, list) or not rollouts:
            raise ValueError("the /rollouts response has no 'rollouts' list")
        if rewards is not None:
            rewards = check_rewards(rewards, len(rollouts), where="the /rollouts response")
        self.raw = raw
        self.request: dict[str, Any] = request
        self.rollouts = [Rollout(item) for item in rollouts]
        self.rewards: list[float] | None = rewards

    def to_group(self, rewards: Sequence[float] | None = None) -> TrainGroup:
        """Build a ``/train_step`` group from these rollouts.

        Args:
            rewards: One reward per rollout, in order; defaults to the server's rewards.

        Raises:
            ValueError: If no rewards are given and the server computed none, or the
                number of rewards differs from the number of rollouts.
        """
        if rewards is None:
            if self.rewards is None:
                raise ValueError("no rewards given and the server computed none (no ground truth)")
            rewards = self.rewards
        checked = check_rewards(rewards, len(self.rollouts), where="to_group")
        return {
            "request": self.request,
            "rollouts": [rollout.raw for rollout in self.rollouts],
            "rewards": checked,
        }

    def __len__(self) -> int:
        return len(self.rollouts)

    def __repr__(self) -> str:
        return f"RolloutsResponse(skill={self.request.get('skill')!r}, rollouts={len(self)}, rewards={self.rewards!r})"


def check_rewards(rewards: Any, expected: int, *, where: str) -> list[float]:
    """Validate a list of finite rewards of the expected length.

    Raises:
        ValueError: Naming ``where``, if the rewards are not a list of ``expected``
            finite numbers.
    """
    if isinstance(rewards, (str, bytes)) or not isinstance(rewards, Sequence):
        raise ValueError(
            f"{where}: rewards must be a list of numbers, got {type(rewards).__name__}"
        )
    if len(rewards) != expected:
        raise ValueError(f"{where}: {len(rewards)} rewards for {expected} rollouts")
    checked = []
    for index, reward in enumerate(rewards):
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            raise ValueError(f"{where}: rewards[{index}] is not a number ({reward!r})")
        if not math.isfinite(reward):
            raise ValueError(f"{where}: rewards[{index}] is not finite ({reward!r})")
        checked.append(float(reward))
    return checked


def check_sft_target(skill: str, target: Any) -> dict[str, Any]:
    """Validate the target of an SFT group for a skill.

    Query takes ``{answer, reasoning?}``; point ``{points}`` or ``{boxes}``; detect
    ``{boxes}``. Points and boxes are checked as ground truth is.

    Raises:
        ValueError: Saying what is wrong with the target.
        pydantic.ValidationError: Naming the coordinate that is wrong.
    """
    if not isinstance(target, Mapping):
        raise ValueError("target must be an object")
    if skill == "query":
        answer = target.get("answer")
        if not isinstance(answer, str) or not answer:
            raise ValueError("target.answer must be a non-empty string")
        unknown = set(target) - {"answer", "reasoning"}
        if unknown:
            raise ValueError(f"target has unknown fields for query: {sorted(unknown)}")
        reasoning = target.get("reasoning")
        if reasoning is not None and not isinstance(reasoning, (str, Mapping)):
            raise ValueError("target.reasoning must be text or a reasoning object")
        return dict(target)
    truth = parse_ground_truth(skill, target)
    assert truth is not None  # a Mapping target is never None
    return truth.model_dump(mode="json", exclude_none=True)


def check_groups(
    groups: Sequence[Mapping[str, Any]], *, allow_sft: bool = False
) -> list[dict[str, Any]]:
    """Validate ``/train_step`` groups before sending them.

    A group is an RL group ``{request, rollouts, rewards}`` (``mode`` ``"rl"`` or absent)
    or, with ``allow_sft``, an SFT group ``{mode: "sft", request, target}``. RL groups
    come back without a ``mode``, SFT groups with it: each dialect's route adds what its
    wire needs.

    Args:
        groups: The groups.
        allow_sft: Accept SFT groups (the ``/finetunes`` wire); refused otherwise, so a
            reader of the ``/adapters`` wire only ever gets RL groups.

    Raises:
        ValueError: Naming the group and field that is wrong.
    """
    if isinstance(groups, Mapping) or not isinstance(groups, Sequence) or not groups:
        raise ValueError("groups must be a non-empty list of train groups")
    checked: list[dict[str, Any]] = []
    for index, group in enumerate(groups):
        where = f"groups[{index}]"
        if not isinstance(group, Mapping):
            raise ValueError(f"{where} must be an object with request, rollouts and rewards")
        mode = group.get("mode", "rl")
        if mode not in (("rl", "sft") if allow_sft else ("rl",)):
            allowed = "'rl' or 'sft'" if allow_sft else "'rl' (SFT groups need /finetunes)"
            raise ValueError(f"{where}.mode must be {allowed}, got {mode!r}")
        request = group.get("request")
        if not isinstance(request, dict) or request.get("skill") not in SKILLS:
            raise ValueError(f"{where}.request must be the echoed request of a known skill")
        if mode == "sft":
            if "target" not in group:
                raise ValueError(f"{where}: an SFT group needs a target")
            try:
                target = check_sft_target(request["skill"], group["target"])
            except ValidationError as exc:
                raise ValueError(f"{where}: {validation_message(exc, 'target')}") from exc
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{where}: {exc}") from exc
            checked.append({"mode": "sft", "request": request, "target": target})
            continue
        rollouts = group.get("rollouts")
        if not isinstance(rollouts, list) or not rollouts:
            raise ValueError(f"{where}.rollouts must be the non-empty list of rollouts received")
        if not all(isinstance(rollout, dict) for rollout in rollouts):
            raise ValueError(f"{where}.rollouts must hold the rollout objects as received")
        rewards = check_rewards(group.get("rewards"), len(rollouts), where=where)
        checked.append({"request": request, "rollouts": rollouts, "rewards": rewards})
    return checked
