"""The ``/adapters`` dialect of the tuning API (the spec's): HTTP to the service and back.

Answers follow the spec: ``{}`` for deletes and train steps, ISO timestamps, string
checkpoint ids. Train steps take RL groups only, as in the spec. Two extensions:
adapters also report ``train_steps``, and a train step takes an optional ``lr``, which
the spec does not have: checked and honoured as on ``/finetunes`` (absent: the service's
default; at 0 nothing changes), while the answer stays ``{}``. The client does not send
``lr`` in this dialect.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from lightning_moondream.api.models import check_groups
from lightning_moondream.server.errors import ServiceError
from lightning_moondream.server.http_common import (
    PREFIX,
    adapters_page,
    authenticated,
    checkpoints_page,
    parse_body,
)
from lightning_moondream.server.results import SampledRollout, StepReport


class _CreateAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(min_length=1, max_length=256)
    rank: StrictInt
    from_checkpoint: StrictStr | None = None


def rollout_json(item: SampledRollout) -> dict[str, Any]:
    """A rollout in this dialect: the spec's fields plus the training metadata."""
    rollout: dict[str, Any] = {
        "skill": item.skill,
        "output": item.output,
        "answer_tokens": item.tokens,
        "coords": item.coords,
        "logprobs": item.logprobs,
        "signature": item.signature,
    }
    if item.reasoning is not None:
        rollout["output"] = {**item.output, "reasoning": _public(item.reasoning)}
        rollout["thinking_tokens"] = item.reasoning["tokens"]
    return rollout


def _public(reasoning: dict[str, Any]) -> dict[str, Any]:
    return {"text": reasoning["text"], "grounding": reasoning["grounding"]}


def check_train_groups(groups: list[Any]) -> list[dict[str, Any]]:
    """A train step's groups in this dialect: RL groups only, checked as the client checks them.

    Checked before the adapter lookup: SFT groups are refused with a message naming
    /finetunes, and a malformed step is a 422 even for an unknown adapter.

    Raises:
        ServiceError: 422 naming the group and field that is wrong.
    """
    try:
        return check_groups(groups)
    except ValueError as exc:
        raise ServiceError(422, str(exc)) from exc


def step_report_json(report: StepReport) -> dict[str, Any]:
    """A train step's answer in this dialect: ``{}``, as in the spec."""
    return {}


router = APIRouter(prefix=PREFIX)
"""This dialect's own routes; ``/rollouts`` and ``/train_step`` are in ``routes_shared``."""


@router.post("/adapters")
async def create_adapter(request: Request) -> dict[str, Any]:
    """``POST /adapters``: a fresh adapter, or one from a checkpoint."""
    service, owner = authenticated(request)
    body = await parse_body(request, _CreateAdapter)
    record = await service.create_adapter(owner, body.name, body.rank, body.from_checkpoint)
    return {"adapter_id": record.adapter_id}


@router.get("/adapters")
async def list_adapters(request: Request) -> dict[str, Any]:
    """``GET /adapters``: one page of the caller's adapters, oldest first."""
    page = adapters_page(request)
    return {
        "adapters": [record.to_json() for record in page.records],
        "next_cursor": page.next_cursor,
    }


@router.get("/adapters/{adapter_id}")
async def get_adapter(adapter_id: str, request: Request) -> dict[str, Any]:
    """``GET /adapters/{id}``."""
    service, owner = authenticated(request)
    return (await service.read_adapter(owner, adapter_id)).to_json()


@router.delete("/adapters/{adapter_id}")
async def delete_adapter(adapter_id: str, request: Request) -> dict[str, Any]:
    """``DELETE /adapters/{id}``, with its checkpoints."""
    service, owner = authenticated(request)
    await service.delete_adapter(owner, adapter_id)
    return {}


@router.post("/adapters/{adapter_id}/checkpoint")
async def save_checkpoint(adapter_id: str, request: Request) -> dict[str, Any]:
    """``POST /adapters/{id}/checkpoint``."""
    service, owner = authenticated(request)
    return (await service.save_checkpoint(owner, adapter_id)).to_json()


@router.get("/adapters/{adapter_id}/checkpoints")
async def list_checkpoints(adapter_id: str, request: Request) -> dict[str, Any]:
    """``GET /adapters/{id}/checkpoints``: one page, oldest first."""
    page = checkpoints_page(request, adapter_id)
    return {
        "checkpoints": [record.to_json() for record in page.records],
        "next_cursor": page.next_cursor,
    }


@router.delete("/adapters/{adapter_id}/checkpoints/{checkpoint_id:path}")
async def delete_checkpoint(
    adapter_id: str, checkpoint_id: str, request: Request
) -> dict[str, Any]:
    """``DELETE /adapters/{id}/checkpoints/{checkpoint_id}``.

    The id in its short form ``chk_001``, or in full ``adapter/chk_001`` (its slash raw
    or as ``%2F``).
    """
    service, owner = authenticated(request)
    service.delete_checkpoint(owner, adapter_id, checkpoint_id)
    return {}


def install(app: FastAPI) -> None:
    """Add this dialect's own routes to ``app``."""
    app.include_router(router)
