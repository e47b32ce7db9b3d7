"""Every endpoint of the tuning API, defined once as data.

An ``Operation`` says what to send (method, path, JSON, query), how safe it is to repeat
(``CallKind``), how long to wait for the answer, and how to read the answer. Building one
validates the caller's input, so nothing invalid is ever sent. The synchronous and
asynchronous clients only differ in how they send an operation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from pydantic import ValidationError

from lightning_moondream.api.errors import InvalidRequestError
from lightning_moondream.api.models import (
    Adapter,
    AdapterPage,
    AnyRequest,
    Checkpoint,
    CheckpointPage,
    GroundTruth,
    RolloutsResponse,
    check_groups,
    check_num_rollouts,
    check_rank,
    parse_ground_truth,
    parse_request,
    split_checkpoint_id,
    validation_message,
)
from lightning_moondream.api.retry import CallKind

T = TypeVar("T")

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
        if parts[0] == "adapters":
            parts = [names.get(index, part) for index, part in enumerate(parts)]
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


def create_adapter(name: str, rank: int, from_checkpoint: str | None = None) -> Operation[Adapter]:
    """``POST /adapters``."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequestError("name must be a non-empty string")
    try:
        body: dict[str, Any] = {"name": name, "rank": check_rank(rank)}
        if from_checkpoint is not None:
            split_checkpoint_id(from_checkpoint)
            body["from_checkpoint"] = from_checkpoint
    except ValueError as exc:
        raise _invalid("create adapter", exc) from exc

    def parse(data: Any) -> Adapter:
        # The spec answers with the id only; fill in what was asked so callers get a
        # complete description without a second request.
        return Adapter.model_validate({"name": name, "rank": rank} | dict(data))

    return Operation("POST", "/adapters", CallKind.STATE_CHANGING, parse, json=body)


def get_adapter(adapter_id: str) -> Operation[Adapter]:
    """``GET /adapters/:adapter_id``."""
    path = f"/adapters/{_segment(adapter_id, 'adapter_id')}"
    return Operation("GET", path, CallKind.SAFE, Adapter.model_validate)


def list_adapters(limit: int = 20, cursor: str | None = None) -> Operation[AdapterPage]:
    """``GET /adapters``, one page."""

    def parse(data: Any) -> AdapterPage:
        return AdapterPage(items=data["adapters"], next_cursor=data.get("next_cursor"))

    return Operation("GET", "/adapters", CallKind.SAFE, parse, params=_page_params(limit, cursor))


def delete_adapter(adapter_id: str) -> Operation[None]:
    """``DELETE /adapters/:adapter_id``."""
    path = f"/adapters/{_segment(adapter_id, 'adapter_id')}"
    return Operation("DELETE", path, CallKind.SAFE, _empty)


def save_checkpoint(adapter_id: str) -> Operation[Checkpoint]:
    """``POST /adapters/:adapter_id/checkpoint``."""
    path = f"/adapters/{_segment(adapter_id, 'adapter_id')}/checkpoint"
    return Operation("POST", path, CallKind.STATE_CHANGING, Checkpoint.model_validate)


def list_checkpoints(
    adapter_id: str, limit: int = 20, cursor: str | None = None
) -> Operation[CheckpointPage]:
    """``GET /adapters/:adapter_id/checkpoints``, one page."""
    path = f"/adapters/{_segment(adapter_id, 'adapter_id')}/checkpoints"

    def parse(data: Any) -> CheckpointPage:
        return CheckpointPage(items=data["checkpoints"], next_cursor=data.get("next_cursor"))

    return Operation("GET", path, CallKind.SAFE, parse, params=_page_params(limit, cursor))


def delete_checkpoint(checkpoint_id: str) -> Operation[None]:
    """``DELETE /adapters/:adapter_id/checkpoints/:checkpoint_id`` from a full id."""
    try:
        adapter_id, short = split_checkpoint_id(checkpoint_id)
    except ValueError as exc:
        raise _invalid("delete checkpoint", exc) from exc
    path = f"/adapters/{_segment(adapter_id, 'adapter_id')}/checkpoints/{_segment(short, 'checkpoint_id')}"
    return Operation("DELETE", path, CallKind.SAFE, _empty)


def rollouts(
    adapter_id: str,
    request: AnyRequest | Mapping[str, Any],
    num_rollouts: int,
    ground_truth: GroundTruth | Mapping[str, Any] | None = None,
) -> Operation[RolloutsResponse]:
    """``POST /rollouts``."""
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
    body: dict[str, Any] = {
        "adapter_id": adapter_id,
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


def train_step(adapter_id: str, groups: Sequence[Mapping[str, Any]]) -> Operation[None]:
    """``POST /train_step``."""
    _segment(adapter_id, "adapter_id")
    try:
        checked = check_groups(groups)
    except ValueError as exc:
        raise _invalid("train_step", exc) from exc
    return Operation(
        "POST",
        "/train_step",
        CallKind.STATE_CHANGING,
        _empty,
        json={"adapter_id": adapter_id, "groups": checked},
        read_timeout=TRAIN_STEP_READ_TIMEOUT,
    )
