"""Every endpoint of the tuning API, defined once as data.

An ``Operation`` says what to send (method, path, JSON, query), how safe it is to repeat
(``CallKind``), how long to wait for the answer, and how to read the answer. The
synchronous and asynchronous clients only differ in how they send an operation.

Input is checked once per call. What holds in both dialects (a request, its ground
truth, the groups of a train step) is checked by ``check_*`` before anything is sent,
even before the dialect is known; the checked input then builds the operation of the
dialect the client speaks, which refuses only what that dialect cannot carry.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

from pydantic import ValidationError

from lightning_moondream.api.errors import InvalidRequestError, UnsupportedFeatureError
from lightning_moondream.api.limits import MAX_PAGE_SIZE, MIN_PAGE_SIZE
from lightning_moondream.api.models import (
    Adapter,
    AdapterPage,
    AnyRequest,
    Checkpoint,
    CheckpointPage,
    GroundTruth,
    RolloutsResponse,
    TrainStepResult,
    check_groups,
    check_num_rollouts,
    check_rank,
    parse_ground_truth,
    parse_request,
    split_checkpoint_id,
    split_checkpoint_ref,
    validation_message,
)
from lightning_moondream.api.retry import CallKind

T = TypeVar("T")

RequestInput = AnyRequest | Mapping[str, Any]
"""A request as a caller gives it: a typed request or the spec's JSON."""
GroundTruthInput = GroundTruth | Mapping[str, Any] | None
"""Ground truth as a caller gives it: typed, the spec's JSON, or none."""

Dialect = Literal["adapters", "finetunes"]
"""A wire dialect: the spec's ``/adapters`` or the Moondream SDK's ``/finetunes``."""
DIALECTS: tuple[Dialect, ...] = ("adapters", "finetunes")

ROLLOUTS_READ_TIMEOUT = 120.0
TRAIN_STEP_READ_TIMEOUT = 900.0
DEFAULT_READ_TIMEOUT = 120.0


class Action(enum.Enum):
    """What an operation does, whatever its dialect's path: usage is counted by it."""

    CREATE_ADAPTER = "create_adapter"
    GET_ADAPTER = "get_adapter"
    LIST_ADAPTERS = "list_adapters"
    DELETE_ADAPTER = "delete_adapter"
    SAVE_CHECKPOINT = "save_checkpoint"
    LIST_CHECKPOINTS = "list_checkpoints"
    DELETE_CHECKPOINT = "delete_checkpoint"
    LOG_METRICS = "log_metrics"
    READ_METRICS = "read_metrics"
    ROLLOUTS = "rollouts"
    TRAIN_STEP = "train_step"
    INFERENCE = "inference"


@dataclass(frozen=True)
class Operation(Generic[T]):
    """One API call, ready to send.

    Attributes:
        action: What the call does, for usage accounting.
        method: HTTP method.
        path: Path below the base URL, with ids already percent-encoded.
        endpoint: ``METHOD /path`` with ids as placeholders, for latency statistics.
        kind: Whether repeating the call is harmless.
        parse: Turns the decoded JSON answer into the result.
        json: The JSON body, if any.
        params: The query string, if any.
        read_timeout: Seconds to wait for the answer.
        images: Number of images in the body, for usage accounting.
        absent_is_done: A 404 means what the call asked for already holds (an
            idempotent delete): the call succeeds with ``parse({})``.
    """

    action: Action
    method: str
    path: str
    endpoint: str
    kind: CallKind
    parse: Callable[[Any], T]
    json: Any = None
    params: Mapping[str, Any] | None = None
    read_timeout: float = DEFAULT_READ_TIMEOUT
    images: int = 0
    absent_is_done: bool = False

    @property
    def label(self) -> str:
        """``METHOD /path`` with ids, for messages."""
        return f"{self.method} {self.path}"


def _invalid(what: str, error: Exception, field: str = "") -> InvalidRequestError:
    if isinstance(error, ValidationError):
        detail = validation_message(error, field)
    else:
        detail = f"{field}: {error}" if field and not str(error).startswith(field) else str(error)
    return InvalidRequestError(f"{what}: {detail}")


def _segment(value: str, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{name} must be a non-empty string, got {value!r}")
    return quote(value, safe="")


def _page_params(limit: int, cursor: str | None) -> dict[str, Any]:
    if isinstance(limit, bool) or not isinstance(limit, int):
        limit_ok = False
    else:
        limit_ok = MIN_PAGE_SIZE <= limit <= MAX_PAGE_SIZE
    if not limit_ok:
        raise InvalidRequestError(
            f"limit must be an integer from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}, got {limit!r}"
        )
    params: dict[str, Any] = {"limit": limit}
    if cursor is not None:
        params["cursor"] = cursor
    return params


def acknowledged(data: Any) -> Any:
    """Return an answer unless it says ``{"ok": false}``.

    Raises:
        ValueError: If the service answered that it did not do it.
    """
    if isinstance(data, Mapping) and data.get("ok") is False:
        raise ValueError('the service answered {"ok": false}')
    return data


def _done(data: Any) -> None:
    acknowledged(data)


def _adapter_path(adapter_id: str, dialect: Dialect) -> str:
    return f"/{dialect}/{_segment(adapter_id, 'adapter_id')}"


def _on_adapter(
    action: Action,
    method: str,
    adapter_id: str,
    dialect: Dialect,
    suffix: str,
    kind: CallKind,
    parse: Callable[[Any], T],
    *,
    endpoint_suffix: str | None = None,
    **options: Any,
) -> Operation[T]:
    """An operation on one adapter: ``/{dialect}/{adapter_id}{suffix}``."""
    endpoint = (
        f"{method} /{dialect}/:adapter_id{suffix if endpoint_suffix is None else endpoint_suffix}"
    )
    path = _adapter_path(adapter_id, dialect) + suffix
    return Operation(action, method, path, endpoint, kind, parse, **options)


def check_name(name: str) -> str:
    """Return an adapter name if it is a non-empty string.

    Raises:
        InvalidRequestError: Naming the field.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequestError("name must be a non-empty string")
    return name


def create_adapter(
    name: str, rank: int, from_checkpoint: str | None = None, *, dialect: Dialect = "adapters"
) -> Operation[Adapter]:
    """``POST /adapters`` or ``POST /finetunes``; the rank is checked against the dialect.

    ``POST /finetunes`` is idempotent by name and rank, so it is repeated like a read.
    """
    check_name(name)
    if dialect == "finetunes" and from_checkpoint is not None:
        raise UnsupportedFeatureError("creating an adapter from a checkpoint", dialect)
    try:
        body: dict[str, Any] = {"name": name, "rank": check_rank(rank, dialect)}
        if from_checkpoint is not None:
            split_checkpoint_id(from_checkpoint)
            body["from_checkpoint"] = from_checkpoint
    except ValueError as exc:
        raise _invalid("create adapter", exc) from exc

    def parse(data: Any) -> Adapter:
        # Both dialects answer with the id only; fill in what was asked so callers get a
        # complete description without a second request.
        if dialect == "finetunes":
            return Adapter.from_finetune({"name": name, "rank": rank} | dict(data))
        return Adapter.model_validate({"name": name, "rank": rank} | dict(data))

    kind = CallKind.SAFE if dialect == "finetunes" else CallKind.STATE_CHANGING
    endpoint = f"POST /{dialect}"
    return Operation(Action.CREATE_ADAPTER, "POST", f"/{dialect}", endpoint, kind, parse, json=body)


def get_adapter(adapter_id: str, *, dialect: Dialect = "adapters") -> Operation[Adapter]:
    """``GET /adapters/:adapter_id`` or ``GET /finetunes/:finetune_id``."""
    parse = Adapter.from_finetune if dialect == "finetunes" else Adapter.model_validate
    return _on_adapter(Action.GET_ADAPTER, "GET", adapter_id, dialect, "", CallKind.SAFE, parse)


def list_adapters(
    limit: int = 20, cursor: str | None = None, *, dialect: Dialect = "adapters"
) -> Operation[AdapterPage]:
    """``GET /adapters`` or ``GET /finetunes``, one page (finetunes oldest first)."""

    def parse(data: Any) -> AdapterPage:
        if dialect == "finetunes":
            items = [Adapter.from_finetune(item) for item in data["finetunes"]]
            # The finetunes wire also says has_more; a cursor is only followed when given.
            return AdapterPage(items=items, next_cursor=data.get("next_cursor") or None)
        return AdapterPage(items=data["adapters"], next_cursor=data.get("next_cursor"))

    path = f"/{dialect}"
    params = _page_params(limit, cursor)
    return Operation(
        Action.LIST_ADAPTERS, "GET", path, f"GET {path}", CallKind.SAFE, parse, params=params
    )


def delete_adapter(adapter_id: str, *, dialect: Dialect = "adapters") -> Operation[None]:
    """``DELETE /adapters/:adapter_id`` or ``DELETE /finetunes/:finetune_id``."""
    return _on_adapter(
        Action.DELETE_ADAPTER, "DELETE", adapter_id, dialect, "", CallKind.SAFE, _done
    )


def _finetune_checkpoint(data: Any, finetune_id: str) -> Checkpoint:
    if not isinstance(data, Mapping):
        raise ValueError("a checkpoint must be a JSON object")
    return Checkpoint.model_validate({"finetune_id": finetune_id, **data})


def save_checkpoint(adapter_id: str, *, dialect: Dialect = "adapters") -> Operation[Checkpoint]:
    """``POST /adapters/:adapter_id/checkpoint`` or ``POST /finetunes/:id/checkpoints/save``."""

    def parse(data: Any) -> Checkpoint:
        if dialect == "finetunes":
            return _finetune_checkpoint(acknowledged(data)["checkpoint"], adapter_id)
        return Checkpoint.model_validate(data)

    suffix = "/checkpoints/save" if dialect == "finetunes" else "/checkpoint"
    return _on_adapter(
        Action.SAVE_CHECKPOINT, "POST", adapter_id, dialect, suffix, CallKind.STATE_CHANGING, parse
    )


def list_checkpoints(
    adapter_id: str, limit: int = 20, cursor: str | None = None, *, dialect: Dialect = "adapters"
) -> Operation[CheckpointPage]:
    """``GET /adapters/:adapter_id/checkpoints`` or ``GET /finetunes/:id/checkpoints``."""

    def parse(data: Any) -> CheckpointPage:
        items = data["checkpoints"]
        if dialect == "finetunes":
            items = [_finetune_checkpoint(item, adapter_id) for item in items]
        # The finetunes wire also says has_more; a cursor is only followed when given.
        return CheckpointPage(items=items, next_cursor=data.get("next_cursor") or None)

    return _on_adapter(
        Action.LIST_CHECKPOINTS,
        "GET",
        adapter_id,
        dialect,
        "/checkpoints",
        CallKind.SAFE,
        parse,
        params=_page_params(limit, cursor),
    )


def delete_checkpoint(ref: str) -> Operation[None]:
    """Delete a checkpoint by its ``ref``; the ref's form says the dialect.

    ``adapter_id/chk_id``: ``DELETE /adapters/:adapter_id/checkpoints/:chk_id``;
    ``finetune_id@step``: ``DELETE /finetunes/:finetune_id/checkpoints/:step``, which is
    idempotent: a checkpoint already gone is deleted.
    """
    try:
        adapter_id, short = split_checkpoint_ref(ref)
    except ValueError as exc:
        raise _invalid("delete checkpoint", exc) from exc
    dialect: Dialect = "finetunes" if isinstance(short, int) else "adapters"
    return _on_adapter(
        Action.DELETE_CHECKPOINT,
        "DELETE",
        adapter_id,
        dialect,
        f"/checkpoints/{_segment(str(short), 'checkpoint')}",
        CallKind.SAFE,
        _done,
        endpoint_suffix="/checkpoints/:checkpoint_id",
        absent_is_done=dialect == "finetunes",
    )


@dataclass(frozen=True)
class CheckedMetrics:
    """Metrics of one step, checked: a step >= 0 and named finite values."""

    step: int
    values: dict[str, float]

    def operation(self, adapter_id: str, dialect: Dialect) -> Operation[int]:
        """``POST /finetunes/:finetune_id/metrics``; answers how many metrics were logged."""
        if dialect != "finetunes":
            raise UnsupportedFeatureError("logging metrics", dialect)

        def parse(data: Any) -> int:
            return int(acknowledged(data).get("logged_count", len(self.values)))

        body = {"step": self.step, "metrics": self.values}
        # Logging twice only repeats a metric line; it never touches the adapter's weights.
        return _on_adapter(
            Action.LOG_METRICS,
            "POST",
            adapter_id,
            dialect,
            "/metrics",
            CallKind.SAFE,
            parse,
            json=body,
        )


def check_metrics(step: int, metrics: Mapping[str, float]) -> CheckedMetrics:
    """Check the metrics of a step before any dialect is involved.

    Raises:
        InvalidRequestError: Naming the step, or the metric whose name or value is wrong.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidRequestError(f"log metrics: step must be an integer >= 0, got {step!r}")
    if not isinstance(metrics, Mapping) or not metrics:
        raise InvalidRequestError(
            "log metrics: metrics must be a non-empty mapping of name to value"
        )
    checked: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequestError(
                f"log metrics: metric names must be non-empty strings, got {name!r}"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise InvalidRequestError(
                f"log metrics: metric {name!r} must be a finite number, got {value!r}"
            )
        checked[name] = float(value)
    return CheckedMetrics(step, checked)


def read_metrics(
    adapter_id: str, *, dialect: Dialect = "finetunes"
) -> Operation[list[dict[str, Any]]]:
    """``GET /finetunes/:finetune_id/metrics`` (the local service's extension)."""
    if dialect != "finetunes":
        raise UnsupportedFeatureError("reading metrics", dialect)

    def parse(data: Any) -> list[dict[str, Any]]:
        metrics = data["metrics"]
        if not isinstance(metrics, list):
            raise ValueError("metrics must be a list")
        return metrics

    return _on_adapter(
        Action.READ_METRICS, "GET", adapter_id, dialect, "/metrics", CallKind.SAFE, parse
    )


_ID_FIELD: dict[Dialect, str] = {"adapters": "adapter_id", "finetunes": "finetune_id"}


@dataclass(frozen=True)
class CheckedRollouts:
    """One ``/rollouts`` call, checked: what remains is what its dialect can carry."""

    adapter_id: str
    request: AnyRequest
    num_rollouts: int
    ground_truth: GroundTruth | None

    def operation(self, dialect: Dialect) -> Operation[RolloutsResponse]:
        """``POST /rollouts`` (the body names ``adapter_id`` or ``finetune_id``)."""
        request = self.request
        if dialect == "adapters" and (
            request.spatial_refs is not None or getattr(request, "reasoning", None)
        ):
            raise UnsupportedFeatureError("reasoning and spatial_refs", dialect)
        body: dict[str, Any] = {
            _ID_FIELD[dialect]: self.adapter_id,
            "num_rollouts": self.num_rollouts,
            "request": request.to_json(),
        }
        if self.ground_truth is not None:
            body["ground_truth"] = self.ground_truth.model_dump(mode="json", exclude_none=True)
        count = self.num_rollouts

        def parse(data: Any) -> RolloutsResponse:
            response = RolloutsResponse(data)
            # A short answer would make a partial group; GRPO's baseline needs every rollout.
            if len(response) != count:
                raise ValueError(f"asked for {count} rollouts, got {len(response)}")
            return response

        return Operation(
            Action.ROLLOUTS,
            "POST",
            "/rollouts",
            "POST /rollouts",
            CallKind.SAFE,
            parse,
            json=body,
            read_timeout=ROLLOUTS_READ_TIMEOUT,
            images=int(request.image_url is not None),
        )


def _checked_field(what: str, field: str, check: Callable[[], T]) -> T:
    try:
        return check()
    except (ValidationError, ValueError, TypeError) as exc:
        raise _invalid(what, exc, field) from exc


def check_rollouts(
    adapter_id: str,
    request: RequestInput,
    num_rollouts: int,
    ground_truth: GroundTruthInput = None,
) -> CheckedRollouts:
    """Check a ``/rollouts`` call before any dialect is involved.

    Raises:
        InvalidRequestError: Naming the field that is wrong.
    """
    _segment(adapter_id, "adapter_id")
    typed = _checked_field("rollouts", "request", lambda: parse_request(request))
    truth = _checked_field(
        "rollouts", "ground_truth", lambda: parse_ground_truth(typed.skill, ground_truth)
    )
    count = _checked_field("rollouts", "", lambda: check_num_rollouts(num_rollouts))
    return CheckedRollouts(adapter_id, typed, count, truth)


def _check_lr(lr: float | None) -> float | None:
    if lr is None:
        return None
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise InvalidRequestError(f"train_step: lr must be a finite number >= 0, got {lr!r}")
    return float(lr)


@dataclass(frozen=True)
class CheckedTrainStep:
    """One ``/train_step`` call, checked: what remains is what its dialect can carry."""

    adapter_id: str
    groups: list[dict[str, Any]]
    lr: float | None
    extra: dict[str, Any]

    def operation(self, dialect: Dialect) -> Operation[TrainStepResult]:
        """``POST /train_step``; ``/finetunes`` adds ``mode`` to RL groups, ``lr``, extras."""
        body: dict[str, Any] = {_ID_FIELD[dialect]: self.adapter_id}
        if dialect == "adapters":
            if any(group.get("mode") == "sft" for group in self.groups):
                raise UnsupportedFeatureError("SFT groups", dialect)
            if self.lr is not None:
                raise UnsupportedFeatureError("a learning rate (lr)", dialect)
            if self.extra:
                raise UnsupportedFeatureError(
                    f"extra train_step fields {sorted(self.extra)}", dialect
                )
            body["groups"] = self.groups
        else:
            body["groups"] = [
                {"mode": "rl", **group} if "mode" not in group else group for group in self.groups
            ]
            if self.lr is not None:
                body["lr"] = self.lr
            body.update(self.extra)

        def parse(data: Any) -> TrainStepResult:
            return TrainStepResult.model_validate(data if isinstance(data, Mapping) else {})

        return Operation(
            Action.TRAIN_STEP,
            "POST",
            "/train_step",
            "POST /train_step",
            CallKind.STATE_CHANGING,
            parse,
            json=body,
            read_timeout=TRAIN_STEP_READ_TIMEOUT,
        )


def check_train_step(
    adapter_id: str,
    groups: Sequence[Mapping[str, Any]],
    lr: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> CheckedTrainStep:
    """Check a ``/train_step`` call before any dialect is involved.

    Raises:
        InvalidRequestError: Naming the group, field or extra that is wrong.
    """
    _segment(adapter_id, "adapter_id")
    checked_lr = _check_lr(lr)
    try:
        checked = check_groups(groups, allow_sft=True)
    except ValueError as exc:
        raise _invalid("train_step", exc) from exc
    extra = dict(extra or {})
    reserved = {"adapter_id", "finetune_id", "groups", "lr"} & set(extra)
    if reserved:
        raise InvalidRequestError(f"train_step: extra fields may not set {sorted(reserved)}")
    return CheckedTrainStep(adapter_id, checked, checked_lr, extra)
