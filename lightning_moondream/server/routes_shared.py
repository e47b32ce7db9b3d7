"""``/rollouts`` and ``/train_step``: one path in both dialects, told apart by the body.

A body naming ``finetune_id`` goes to the ``/finetunes`` dialect, one naming
``adapter_id`` to the ``/adapters`` dialect, if served; a body naming neither goes to
the first dialect served, whose validation then names the missing field.

Both dialects' bodies carry the same fields but for the name of the adapter's id (and
``/finetunes`` refuses an empty list of groups outright), so each path has one flow;
what a dialect spells its own way (its rollouts, its train step's groups and answer)
comes from its module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from lightning_moondream.server import routes_adapters, routes_finetunes
from lightning_moondream.server.http_common import PREFIX, authenticated, json_answer, json_body
from lightning_moondream.server.middleware import fail_after_train_step
from lightning_moondream.server.results import SampledRollout, StepReport
from lightning_moondream.server.validation import check_lr, validate_body


class _Rollouts(BaseModel):
    """A ``/rollouts`` body as the ``/adapters`` dialect (the spec) spells it."""

    model_config = ConfigDict(extra="forbid")
    adapter_id: StrictStr
    num_rollouts: StrictInt
    request: dict[str, Any]
    ground_truth: dict[str, Any] | None = None


class _FinetuneRollouts(_Rollouts):
    """A ``/rollouts`` body as the ``/finetunes`` dialect spells it."""

    adapter_id: StrictStr = Field(alias="finetune_id")


class _TrainStep(BaseModel):
    """A ``/train_step`` body as the ``/adapters`` dialect spells it."""

    model_config = ConfigDict(extra="forbid")
    adapter_id: StrictStr
    groups: list[Any]
    # Beyond the spec in the /adapters dialect: see routes_adapters.
    lr: Any = None


class _FinetuneTrainStep(_TrainStep):
    """A ``/train_step`` body as the ``/finetunes`` dialect spells it."""

    adapter_id: StrictStr = Field(alias="finetune_id")
    groups: list[Any] = Field(min_length=1)


@dataclass(frozen=True)
class _DialectWire:
    """How one dialect spells ``/rollouts`` and ``/train_step``.

    Attributes:
        id_field: The body field naming the adapter.
        rollouts_body: The ``/rollouts`` body.
        rollout_json: A sampled rollout as the dialect's JSON.
        train_step_body: The ``/train_step`` body.
        check_groups: Checks a train step's groups before the adapter is looked up;
            ``None`` where the service verifies them as sent.
        step_json: The answer to a train step.
    """

    id_field: str
    rollouts_body: type[_Rollouts]
    rollout_json: Callable[[SampledRollout], dict[str, Any]]
    train_step_body: type[_TrainStep]
    check_groups: Callable[[list[Any]], list[dict[str, Any]]] | None
    step_json: Callable[[StepReport], dict[str, Any]]


_DIALECTS = {
    "finetunes": _DialectWire(
        id_field="finetune_id",
        rollouts_body=_FinetuneRollouts,
        rollout_json=routes_finetunes.rollout_json,
        train_step_body=_FinetuneTrainStep,
        check_groups=None,
        step_json=routes_finetunes.step_report_json,
    ),
    "adapters": _DialectWire(
        id_field="adapter_id",
        rollouts_body=_Rollouts,
        rollout_json=routes_adapters.rollout_json,
        train_step_body=_TrainStep,
        check_groups=routes_adapters.check_train_groups,
        step_json=routes_adapters.step_report_json,
    ),
}
"""Each dialect's wire, in the order its id field is looked for in a body."""

router = APIRouter(prefix=PREFIX)


def dialect_of(request: Request, body: dict[str, Any]) -> str:
    """The dialect served that a body's id field names (else the first one served)."""
    served: tuple[str, ...] = request.app.state.dialects
    for dialect, wire in _DIALECTS.items():
        if wire.id_field in body and dialect in served:
            return dialect
    return served[0]


@router.post("/rollouts")
async def rollouts(request: Request) -> Response:
    """``POST /rollouts`` in the dialect of its body: the request echoed, its rollouts."""
    service, owner = authenticated(request)
    body = await json_body(request)
    wire = _DIALECTS[dialect_of(request, body)]
    parsed = validate_body(body, wire.rollouts_body)
    batch = await service.sample_rollouts(
        owner, parsed.adapter_id, parsed.num_rollouts, parsed.request, parsed.ground_truth
    )
    answer = {
        "request": parsed.request,
        "rollouts": [wire.rollout_json(rollout) for rollout in batch.rollouts],
        "rewards": batch.rewards,
    }
    return json_answer(answer)


@router.post("/train_step")
async def train_step(request: Request) -> dict[str, Any]:
    """``POST /train_step`` in the dialect of its body, then any after-step fault."""
    service, owner = authenticated(request)
    body = await json_body(request)
    wire = _DIALECTS[dialect_of(request, body)]
    parsed = validate_body(body, wire.train_step_body)
    lr = check_lr(parsed.lr)
    groups = parsed.groups if wire.check_groups is None else wire.check_groups(parsed.groups)
    report = await service.train_step(owner, parsed.adapter_id, groups, lr)
    answer = wire.step_json(report)
    fail_after_train_step(request, request.app.faults)
    return answer


def install(app: FastAPI) -> None:
    """Add ``/rollouts`` and ``/train_step`` to ``app``."""
    app.include_router(router)
