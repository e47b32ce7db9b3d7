"""Typed calls and answers of Moondream's inference API, and its model ids.

A call (``QueryCall``, ``DetectCall``, ``PointCall``, ``CaptionCall``) validates what
the caller gave and builds the JSON body that Moondream's own SDK sends; an answer is
read into a result (``QueryResult``, ``DetectResult``, ``PointResult``,
``CaptionResult``). Requests are checked by the tuning API's request models, so both
APIs refuse the same settings, spatial references and prompts.

A model is the base model ``moondream3-preview``, a saved finetune checkpoint
``moondream3-preview/{finetune_id}@{step}`` (``model_id``), or a checkpoint of the
``/adapters`` dialect ``moondream3-preview/{adapter_id}@{chk_id}``, from its full id
``adapter_id/chk_id`` (``checkpoint_model_id`` gives the model of a checkpoint ref of
either dialect).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from lightning_moondream.api.errors import InvalidRequestError
from lightning_moondream.api.limits import MAX_SPATIAL_REFS
from lightning_moondream.api.models import (
    FINETUNE_MODEL,
    Box,
    DetectRequest,
    Point,
    PointRequest,
    QueryRequest,
    Settings,
    validation_message,
)
from lightning_moondream.images import ImageError, ImageInput, encode_image

BASE_MODEL = FINETUNE_MODEL
"""The model the inference API answers with when a request names none."""

ResultT_co = TypeVar("ResultT_co", covariant=True)
CaptionLength = Literal["short", "normal", "long"]
CAPTION_LENGTHS: tuple[CaptionLength, ...] = get_args(CaptionLength)

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_CHECKPOINT = r"chk_[0-9]+"
_MODEL = re.compile(
    rf"(?P<base>{_NAME})"
    rf"(?:/(?P<finetune_id>{_NAME})@(?:(?P<step>[0-9]+)|(?P<checkpoint>{_CHECKPOINT})))?"
)
MODEL_FORMS = (
    f"'{BASE_MODEL}', '{BASE_MODEL}/FINETUNE_ID@STEP' or '{BASE_MODEL}/ADAPTER_ID@chk_NNN'"
)
"""The forms a model id takes, for messages."""


# Model ids ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceModel:
    """A model id taken apart.

    Attributes:
        base: The base model, e.g. ``moondream3-preview``.
        finetune_id: The finetune (or adapter) whose checkpoint answers, or ``None`` for
            the base model.
        step: The train step of that checkpoint, if named by its step.
        checkpoint: The short id (``chk_001``) of that checkpoint, if named by its id
            (``/adapters`` checkpoints).
    """

    base: str
    finetune_id: str | None = None
    step: int | None = None
    checkpoint: str | None = None

    @property
    def is_base(self) -> bool:
        """Tell whether this is a base model rather than a finetune checkpoint."""
        return self.finetune_id is None

    def __str__(self) -> str:
        if self.is_base:
            return self.base
        which = self.step if self.checkpoint is None else self.checkpoint
        return f"{self.base}/{self.finetune_id}@{which}"


def parse_model(model: str) -> InferenceModel:
    """Take a model id apart: ``BASE``, ``BASE/FINETUNE_ID@STEP`` or ``BASE/ADAPTER_ID@chk_NNN``.

    Raises:
        ValueError: Naming ``model`` and the forms it may take.
    """
    match = _MODEL.fullmatch(model) if isinstance(model, str) else None
    if match is None:
        hint = ""
        if isinstance(model, str) and "/" not in model and "@" in model:
            hint = f" (a checkpoint is named with its base model: '{BASE_MODEL}/{model}')"
        raise ValueError(f"model must be {MODEL_FORMS}, got {model!r}{hint}")
    step = match["step"]
    return InferenceModel(
        match["base"],
        match["finetune_id"],
        None if step is None else int(step),
        match["checkpoint"],
    )


def model_id(finetune_id: str, step: int, *, base: str = BASE_MODEL) -> str:
    """The model id of a saved finetune checkpoint: ``moondream3-preview/FT@STEP``.

    Raises:
        ValueError: If the finetune id or the step cannot form a model id.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer of 0 or more, got {step!r}")
    if not isinstance(finetune_id, str) or not re.fullmatch(_NAME, finetune_id):
        raise ValueError(
            "finetune_id must be letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit, got {finetune_id!r}"
        )
    return str(parse_model(f"{base}/{finetune_id}@{step}"))


def checkpoint_model_id(ref: str, *, base: str = BASE_MODEL) -> str:
    """The model id of a checkpoint ref of either dialect.

    A ``/finetunes`` ref ``FT@STEP`` is ``moondream3-preview/FT@STEP``; an ``/adapters``
    checkpoint id ``ADAPTER_ID/chk_NNN`` is ``moondream3-preview/ADAPTER_ID@chk_NNN``.

    Raises:
        ValueError: If the ref is neither form.
    """
    adapter_id, slash, short = ref.partition("/") if isinstance(ref, str) else ("", "", "")
    candidate = f"{base}/{adapter_id}@{short}" if slash else f"{base}/{ref}"
    try:
        return str(parse_model(candidate))
    except ValueError:
        raise ValueError(
            f"checkpoint ref must be 'FINETUNE_ID@STEP' or 'ADAPTER_ID/chk_NNN', got {ref!r}"
        ) from None


def check_model(model: str | None) -> str | None:
    """Return a model id if well formed (``None`` means the base model).

    Raises:
        InvalidRequestError: Naming ``model``, before anything is sent.
    """
    if model is None:
        return None
    try:
        return str(parse_model(model))
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc


# Calls ----------------------------------------------------------------------------------


def _encode(image: ImageInput) -> str:
    try:
        return encode_image(image)
    except ImageError as exc:
        raise InvalidRequestError(f"image: {exc}") from exc


def _spatial_refs(refs: Sequence[Sequence[float]] | None, what: str) -> Any:
    if isinstance(refs, Sequence) and len(refs) > MAX_SPATIAL_REFS:
        raise InvalidRequestError(
            f"{what}: spatial_refs holds {len(refs)} references; at most {MAX_SPATIAL_REFS}"
        )
    return refs


def _validated(model: type[BaseModel], fields: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Validate fields with a request model; return what was given, as JSON."""
    given = {name: value for name, value in fields.items() if value is not None}
    try:
        request = model.model_validate(given)
    except ValidationError as exc:
        raise InvalidRequestError(f"{what}: {validation_message(exc)}") from exc
    # Only what the caller set is sent, so the server's own defaults apply to the rest
    # (detect's max_tokens default differs from the other skills').
    return request.model_dump(mode="json", exclude_unset=True, exclude={"skill"})


@dataclass(frozen=True)
class _Call(ABC):
    model: str | None = field(default=None, kw_only=True)

    path: ClassVar[str]
    streams: ClassVar[bool] = False
    """Whether the endpoint can stream its text, so the body always says ``stream``."""

    @abstractmethod
    def to_json(self) -> dict[str, Any]:
        """Validate the call and build its body (without ``stream``).

        Raises:
            InvalidRequestError: Naming the field that is wrong.
        """

    @abstractmethod
    def parse(self, data: Any) -> InferenceResult:
        """Read the answer."""

    def _body(self, fields: dict[str, Any]) -> dict[str, Any]:
        model = check_model(self.model)
        return fields if model is None else {**fields, "model": model}


@dataclass(frozen=True)
class QueryCall(_Call):
    """``POST /query``: ask a question, about an image or not.

    Attributes:
        image: A PIL image, a path, encoded bytes or a data URL; ``None`` for text only.
        question: The question.
        model: The model id; ``None`` means the client's model.
        settings: Sampling settings (``max_objects`` is refused).
        reasoning: Ask for the reasoning behind the answer.
        spatial_refs: Points ``[x, y]`` or boxes ``[x1, y1, x2, y2]`` (0-1).
    """

    image: ImageInput | None
    question: str
    settings: Settings | Mapping[str, Any] | None = None
    reasoning: bool | None = None
    spatial_refs: Sequence[Sequence[float]] | None = None

    path: ClassVar[str] = "/query"
    streams: ClassVar[bool] = True

    def to_json(self) -> dict[str, Any]:
        """Validate the call and build its body (without ``stream``).

        Raises:
            InvalidRequestError: Naming the field that is wrong.
        """
        image_url = None if self.image is None else _encode(self.image)
        fields = {
            "question": self.question,
            "image_url": image_url,
            "settings": self.settings,
            "reasoning": self.reasoning,
            "spatial_refs": _spatial_refs(self.spatial_refs, "query"),
        }
        return self._body(_validated(QueryRequest, fields, "query"))

    def parse(self, data: Any) -> QueryResult:
        """Read the answer."""
        return QueryResult.model_validate(data)


@dataclass(frozen=True)
class _ObjectCall(_Call):
    """A call about every instance of an object in an image."""

    image: ImageInput
    object: str
    settings: Settings | Mapping[str, Any] | None = None

    request_model: ClassVar[type[BaseModel]]
    """The tuning API's request model that checks the call."""

    def to_json(self) -> dict[str, Any]:
        """Validate the call and build its body.

        Raises:
            InvalidRequestError: Naming the field that is wrong.
        """
        fields = {
            "image_url": _encode(self.image),
            "object": self.object,
            "settings": self.settings,
            **self._more_fields(),
        }
        skill = self.path.removeprefix("/")
        return self._body(_validated(self.request_model, fields, skill))

    def _more_fields(self) -> dict[str, Any]:
        """Fields of this skill's body beyond the image, the object and the settings."""
        return {}


@dataclass(frozen=True)
class DetectCall(_ObjectCall):
    """``POST /detect``: every instance of an object in an image, as boxes.

    Attributes:
        image: A PIL image, a path, encoded bytes or a data URL.
        object: What to detect.
        model: The model id; ``None`` means the client's model.
        settings: Sampling settings, ``max_objects`` included.
    """

    path: ClassVar[str] = "/detect"
    request_model: ClassVar[type[BaseModel]] = DetectRequest

    def parse(self, data: Any) -> DetectResult:
        """Read the answer."""
        return DetectResult.model_validate(data)


@dataclass(frozen=True)
class PointCall(_ObjectCall):
    """``POST /point``: a point on every instance of an object in an image.

    Attributes:
        image: A PIL image, a path, encoded bytes or a data URL.
        object: What to point at.
        model: The model id; ``None`` means the client's model.
        settings: Sampling settings (``max_objects`` is refused).
        spatial_refs: Points ``[x, y]`` or boxes ``[x1, y1, x2, y2]`` (0-1).
    """

    spatial_refs: Sequence[Sequence[float]] | None = None

    path: ClassVar[str] = "/point"
    request_model: ClassVar[type[BaseModel]] = PointRequest

    def parse(self, data: Any) -> PointResult:
        """Read the answer."""
        return PointResult.model_validate(data)

    def _more_fields(self) -> dict[str, Any]:
        return {"spatial_refs": _spatial_refs(self.spatial_refs, "point")}


@dataclass(frozen=True)
class CaptionCall(_Call):
    """``POST /caption``: describe an image.

    Attributes:
        image: A PIL image, a path, encoded bytes or a data URL.
        length: ``"short"``, ``"normal"`` or ``"long"``.
        model: The model id; ``None`` means the client's model.
        settings: Sampling settings (``max_objects`` is refused).
    """

    image: ImageInput
    length: CaptionLength = "normal"
    settings: Settings | Mapping[str, Any] | None = None

    path: ClassVar[str] = "/caption"
    streams: ClassVar[bool] = True

    def to_json(self) -> dict[str, Any]:
        """Validate the call and build its body (without ``stream``).

        Raises:
            InvalidRequestError: Naming the field that is wrong.
        """
        if self.length not in CAPTION_LENGTHS:
            raise InvalidRequestError(
                f"caption: length must be one of {', '.join(CAPTION_LENGTHS)}, got {self.length!r}"
            )
        fields: dict[str, Any] = {"image_url": _encode(self.image), "length": self.length}
        if self.settings is not None:
            settings = _validated(Settings, _settings_fields(self.settings), "caption: settings")
            if "max_objects" in settings:
                raise InvalidRequestError(
                    "caption: settings.max_objects is only valid for detect, not caption"
                )
            fields["settings"] = settings
        return self._body(fields)

    def parse(self, data: Any) -> CaptionResult:
        """Read the answer."""
        return CaptionResult.model_validate(data)


def _settings_fields(settings: Settings | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(settings, Settings):
        return settings.model_dump(exclude_unset=True)
    if not isinstance(settings, Mapping):
        raise InvalidRequestError(
            f"caption: settings must be Settings or a dict, got {type(settings).__name__}"
        )
    return settings


class InferenceCall(Protocol[ResultT_co]):
    """One call of the inference API: what to send and how to read the answer."""

    path: ClassVar[str]
    streams: ClassVar[bool]

    def to_json(self) -> dict[str, Any]:
        """Validate the call and build its body (without ``stream``)."""
        ...

    def parse(self, data: Any) -> ResultT_co:
        """Read the answer."""
        ...


# Results --------------------------------------------------------------------------------

_ANSWER = ConfigDict(extra="allow", frozen=True)
"""Answers keep fields this package does not know, so a newer server loses nothing."""


class ReasoningGrounding(BaseModel):
    """The points a span of the reasoning text refers to."""

    model_config = _ANSWER
    start_idx: int
    end_idx: int
    points: list[list[float]] = []


class Reasoning(BaseModel):
    """The reasoning behind a query's answer, asked with ``reasoning=True``."""

    model_config = _ANSWER
    text: str
    grounding: list[ReasoningGrounding] = []


class QueryResult(BaseModel):
    """The answer of ``/query``."""

    model_config = _ANSWER
    request_id: str | None = None
    answer: str
    reasoning: Reasoning | None = None


class DetectResult(BaseModel):
    """The answer of ``/detect``: boxes in normalized image coordinates."""

    model_config = _ANSWER
    request_id: str | None = None
    objects: list[Box]


class PointResult(BaseModel):
    """The answer of ``/point``: points in normalized image coordinates."""

    model_config = _ANSWER
    request_id: str | None = None
    points: list[Point]


class CaptionMetrics(BaseModel):
    """What generating a caption took, as the server reports it."""

    model_config = _ANSWER
    input_tokens: int | None = None
    output_tokens: int | None = None
    prefill_time_ms: float | None = None
    decode_time_ms: float | None = None
    ttft_ms: float | None = None


class CaptionResult(BaseModel):
    """The answer of ``/caption``."""

    model_config = _ANSWER
    request_id: str | None = None
    caption: str
    metrics: CaptionMetrics | None = None
    finish_reason: str | None = None


InferenceResult = QueryResult | DetectResult | PointResult | CaptionResult
"""The result of one inference call."""
