"""Every endpoint of the tuning API, defined once as data.

An ``Operation`` says what to send (method, path, JSON, query), how safe it is to repeat
(``CallKind``), how long to wait for the answer, and how to read the answer. Building one
validates the caller's input, so nothing invalid is ever sent. The synchronous and
asynchronous clients only differ in how they send an operation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

from pydantic import ValidationError

from lightning_moondream.api.errors import InvalidRequestError, UnsupportedFeatureError
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

Dialect = Literal["adapters", "finetunes"]
"""A wire dialect: the spec's ``/adapters`` or the Moondream SDK's ``/finetunes``."""
DIALECTS: tuple[Dialect, ...] = ("adapters", "finetunes")

ROLLOUTS_READ_TIMEOUT = 120.0
TRAIN_STEP_READ_TIMEOUT = 900.0
DEFAULT_READ_TIMEOUT = 120.0


@dataclass(frozen=True)
class Operation(Generic[T]):
    """One API call, ready to send.

    Attributes:
        method: HTTP method.
        path: Path below the base URL, with ids already percent-encoded.
        kind: Whether repeating the call is harmless.
        parse: Turns the decoded JSON answer into the result.
        json: The JSON body, if any.
        params: The query string, if any.
        read_timeout: Seconds to wait for the answer.
        images: Number of images in the body, for usage accounting.
    """

    method: str
    path: str
    kind: CallKind
    parse: Callable[[Any], T]
    json: Any = None
    params: Mapping[str, Any] | None = None
    read_timeout: float = DEFAULT_READ_TIMEOUT
    images: int = 0

    @property
    def label(self) -> str:
        """``METHOD /path`` with ids, for messages."""
        return f"{self.method} {self.path}"

    @property
    def endpoint(self) -> str:
        """``METHOD /path`` with ids replaced by placeholders, for usage statistics."""
        parts = self.path.strip("/").split("/")
        names = {1: ":adapter_id", 3: ":checkpoint_id"}
        if parts[0] in DIALECTS:
            parts = [
                names.get(index, part) if part != "save" else part
                for index, part in enumerate(parts)
            ]
        return f"{self.method} /{'/'.join(parts)}"


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


def _limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100:
        raise InvalidRequestError(f"limit must be an integer from 1 to 100, got {limit!r}")
    return limit


def _page_params(limit: int, cursor: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": _limit(limit)}
    if cursor is not None:
        params["cursor"] = cursor
    return params


def _empty(_: Any) -> None:
    return None


def _name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequestError("name must be a non-empty string")
    return name


def create_adapter(
    name: str, rank: int, from_checkpoint: str | None = None, *, dialect: Dialect = "adapters"
) -> Operation[Adapter]:
    """``POST /adapters`` or ``POST /finetunes``."""
    _name(name)
    if dialect == "finetunes" and from_checkpoint is not None:
        raise UnsupportedFeatureError("creating an adapter from a checkpoint", dialect)
    try:
        body: dict[str, Any] = {"name": name, "rank": check_rank(rank)}
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

    return Operation("POST", f"/{dialect}", CallKind.STATE_CHANGING, parse, json=body)


def _adapter_path(adapter_id: str, dialect: Dialect) -> str:
    return f"/{dialect}/{_segment(adapter_id, 'adapter_id')}"


def get_adapter(adapter_id: str, *, dialect: Dialect = "adapters") -> Operation[Adapter]:
    """``GET /adapters/:adapter_id`` or ``GET /finetunes/:finetune_id``."""
    parse = Adapter.from_finetune if dialect == "finetunes" else Adapter.model_validate
    return Operation("GET", _adapter_path(adapter_id, dialect), CallKind.SAFE, parse)


def list_adapters(
    limit: int = 20, cursor: str | None = None, *, dialect: Dialect = "adapters"
) -> Operation[AdapterPage]:
    """``GET /adapters``, one page (the ``/finetunes`` dialect has no list)."""
    if dialect == "finetunes":
        raise UnsupportedFeatureError("listing adapters", dialect)

    def parse(data: Any) -> AdapterPage:
        return AdapterPage(items=data["adapters"], next_cursor=data.get("next_cursor"))

    return Operation("GET", "/adapters", CallKind.SAFE, parse, params=_page_params(limit, cursor))


def delete_adapter(adapter_id: str, *, dialect: Dialect = "adapters") -> Operation[None]:
    """``DELETE /adapters/:adapter_id`` or ``DELETE /finetunes/:finetune_id``."""
    return Operation("DELETE", _adapter_path(adapter_id, dialect), CallKind.SAFE, _empty)


def _finetune_checkpoint(data: Any, finetune_id: str) -> Checkpoint:
    if not isinstance(data, Mapping):
        raise ValueError("a checkpoint must be a JSON object")
    return Checkpoint.model_validate({"finetune_id": finetune_id, **data})


def save_checkpoint(adapter_id: str, *, dialect: Dialect = "adapters") -> Operation[Checkpoint]:
    """``POST /adapters/:adapter_id/checkpoint`` or ``POST /finetunes/:id/checkpoints/save``."""
    if dialect == "finetunes":

        def parse(data: Any) -> Checkpoint:
            return _finetune_checkpoint(data["checkpoint"], adapter_id)

        path = f"{_adapter_path(adapter_id, dialect)}/checkpoints/save"
        return Operation("POST", path, CallKind.STATE_CHANGING, parse)
    path = f"{_adapter_path(adapter_id, dialect)}/checkpoint"
    return Operation("POST", path, CallKind.STATE_CHANGING, Checkpoint.model_validate)


def list_checkpoints(
    adapter_id: str, limit: int = 20, cursor: str | None = None, *, dialect: Dialect = "adapters"
) -> Operation[CheckpointPage]:
    """``GET /adapters/:adapter_id/checkpoints`` or ``GET /finetunes/:id/checkpoints``."""
    path = f"{_adapter_path(adapter_id, dialect)}/checkpoints"

    def parse(data: Any) -> CheckpointPage:
        items = data["checkpoints"]
        if dialect == "finetunes":
            items = [_finetune_checkpoint(item, adapter_id) for item in items]
        # The finetunes wire also says has_more; a cursor is only followed when given.
        return CheckpointPage(items=items, next_cursor=data.get("next_cursor") or None)

    return Operation("GET", path, CallKind.SAFE, parse, params=_page_params(limit, cursor))


def delete_checkpoint(ref: str) -> Operation[None]:
    """Delete a checkpoint by its ``ref``; the ref's form says the dialect.

    ``adapter_id/chk_id``: ``DELETE /adapters/:adapter_id/checkpoints/:chk_id``;
    ``finetune_id@step``: ``DELETE /finetunes/:finetune_id/checkpoints/:step``.
    """
    try:
        adapter_id, short = split_checkpoint_ref(ref)
    except ValueError as exc:
        raise _invalid("delete checkpoint", exc) from exc
    dialect: Dialect = "finetunes" if isinstance(short, int) else "adapters"
    path = f"{_adapter_path(adapter_id, dialect)}/checkpoints/{_segment(str(short), 'checkpoint')}"
    return Operation("DELETE", path, CallKind.SAFE, _empty)


def checkpoint_dialect(ref: str) -> Dialect:
    """The dialect a checkpoint ref belongs to (``finetune_id@step`` is ``/finetunes``)."""
    return "finetunes" if "/" not in ref and "@" in ref else "adapters"


def log_metrics(
    adapter_id: str, step: int, metrics: Mapping[str, float], *, dialect: Dialect = "finetunes"
) -> Operation[int]:
    """``POST /finetunes/:finetune_id/metrics``; answers how many metrics were logged."""
    if dialect != "finetunes":
        raise UnsupportedFeatureError("logging metrics", dialect)
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

    def parse(data: Any) -> int:
        return int(data.get("logged_count", len(checked)))

    path = f"{_adapter_path(adapter_id, dialect)}/metrics"
    # Logging twice only repeats a metric line; it never touches the adapter's weights.
    return Operation("POST", path, CallKind.SAFE, parse, json={"step": step, "metrics": checked})


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

    path = f"{_adapter_path(adapter_id, dialect)}/metrics"
    return Operation("GET", path, CallKind.SAFE, parse)


def rollouts(
    adapter_id: str,
    request: AnyRequest | Mapping[str, Any],
    num_rollouts: int,
    ground_truth: GroundTruth | Mapping[str, Any] | None = None,
    *,
    dialect: Dialect = "adapters",
) -> Operation[RolloutsResponse]:
    """``POST /rollouts`` (the body names ``adapter_id`` or ``finetune_id``)."""
    _segment(adapter_id, "adapter_id")
    try:
        typed = parse_request(request)
    except (ValidationError, ValueError, TypeError) as exc:
        raise _invalid("rollouts", exc, "request") from exc
    try:
        truth = parse_ground_truth(typed.skill, ground_truth)
    except (ValidationError, ValueError, TypeError) as exc:
        raise _invalid("rollouts", exc, "ground_truth") from exc
    try:
        count = check_num_rollouts(num_rollouts)
    except ValueError as exc:
        raise _invalid("rollouts", exc) from exc
    if dialect == "adapters" and (
        typed.spatial_refs is not None or getattr(typed, "reasoning", None)
    ):
        raise UnsupportedFeatureError("reasoning and spatial_refs", dialect)
    body: dict[str, Any] = {
        _ID_FIELD[dialect]: adapter_id,
        "num_rollouts": count,
        "request": typed.to_json(),
    }
    if truth is not None:
        body["ground_truth"] = truth.model_dump(mode="json", exclude_none=True)
    images = int(typed.image_url is not None)

    def parse(data: Any) -> RolloutsResponse:
        response = RolloutsResponse(data)
        # A short answer would make a partial group; GRPO's baseline needs every rollout.
        if len(response) != count:
            raise ValueError(f"asked for {count} rollouts, got {len(response)}")
        return response

    return Operation(
        "POST",
        "/rollouts",
        CallKind.SAFE,
        parse,
        json=body,
        read_timeout=ROLLOUTS_READ_TIMEOUT,
        images=images,
    )


_ID_FIELD: dict[Dialect, str] = {"adapters": "adapter_id", "finetunes": "finetune_id"}


def _check_lr(lr: float | None) -> float | None:
    if lr is None:
        return None
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise InvalidRequestError(f"train_step: lr must be a finite number >= 0, got {lr!r}")
    return float(lr)


def train_step(
    adapter_id: str,
    groups: Sequence[Mapping[str, Any]],
    *,
    lr: float | None = None,
    extra: Mapping[str, Any] | None = None,
    dialect: Dialect = "adapters",
) -> Operation[TrainStepResult]:
    """``POST /train_step``; the ``/finetunes`` wire adds ``mode`` to RL groups, ``lr``, extras."""
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
    body: dict[str, Any] = {_ID_FIELD[dialect]: adapter_id}
    if dialect == "adapters":
        if any(group.get("mode") == "sft" for group in checked):
            raise UnsupportedFeatureError("SFT groups", dialect)
        if checked_lr is not None:
            raise UnsupportedFeatureError("a learning rate (lr)", dialect)
        if extra:
            raise UnsupportedFeatureError(f"extra train_step fields {sorted(extra)}", dialect)
        body["groups"] = checked
    else:
        body["groups"] = [
            {"mode": "rl", **group} if "mode" not in group else group for group in checked
        ]
        if checked_lr is not None:
            body["lr"] = checked_lr
        body.update(extra)

    def parse(data: Any) -> TrainStepResult:
        return TrainStepResult.model_validate(data if isinstance(data, Mapping) else {})

    return Operation(
        "POST",
        "/train_step",
        CallKind.STATE_CHANGING,
        parse,
        json=body,
        read_timeout=TRAIN_STEP_READ_TIMEOUT,
    )
