"""The ``/finetunes`` dialect of the tuning API (Moondream's current SDK): HTTP to the service.

A finetune is an adapter: its id is the adapter's id, and both dialects see the same
weights, steps and checkpoints. Times are milliseconds since the epoch; checkpoints are
addressed by the train step they were saved at; detect rollouts hold their boxes under
``objects``. Two extensions: a finetune also reports ``train_steps``, and
``GET /finetunes/{id}/metrics`` reads back the metrics logged.

A train step mixes RL groups (``{"mode": "rl", "request", "rollouts", "rewards"}``) and
SFT groups (``{"mode": "sft", "request", "target"}``) and answers what it did:
``step``, ``applied`` (false at ``lr`` 0, which computes the step but changes and counts
nothing), ``kl``, ``router_kl`` (always ``None``: the policy has no router),
``grad_norm``, ``sft_loss``, ``reward_mean`` and ``reward_std``.

Names, ranks, idempotent creation and deletes follow Moondream's API reference (see
``finetunes``): ranks 8, 16, 24 or 32, deletes answer ``{"ok": true}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from lightning_moondream.server.finetunes import Finetunes
from lightning_moondream.server.http_common import (
    PREFIX,
    adapters_page,
    authenticated,
    checkpoints_page,
    parse_body,
)
from lightning_moondream.server.results import SampledRollout, StepReport
from lightning_moondream.server.store import AdapterRecord, CheckpointRecord
from lightning_moondream.server.validation import check_step

MAX_METRICS = 1000
"""Most metrics one call may log."""


class _CreateFinetune(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(min_length=1, max_length=256)
    rank: StrictInt


class _Metrics(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: StrictInt = Field(ge=0)
    metrics: dict[str, Any] = Field(min_length=1, max_length=MAX_METRICS)


def finetune_json(record: AdapterRecord) -> dict[str, Any]:
    """A finetune as this dialect describes it, plus ``train_steps``."""
    return {
        "finetune_id": record.adapter_id,
        "name": record.name,
        "rank": record.rank,
        "created_at_ms": record.created_at_ms,
        "updated_at_ms": record.updated_at_ms or record.created_at_ms,
        "train_steps": record.train_steps,
    }


def checkpoint_json(record: CheckpointRecord, finetune_id: str) -> dict[str, Any]:
    """A checkpoint as this dialect describes it."""
    return {
        "checkpoint_id": record.checkpoint_id,
        "finetune_id": finetune_id,
        "step": record.step,
        "expires_at_ms": record.expires_at_ms,
        "created_at_ms": record.created_at_ms,
        "updated_at_ms": record.created_at_ms,
    }


def rollout_json(item: SampledRollout) -> dict[str, Any]:
    """A rollout in this dialect, with the training metadata to pass back."""
    output = dict(item.output)
    sizes: list[list[float]] = []
    if item.skill == "detect":
        output = {"objects": output["boxes"]}
        sizes = [
            [box["x_max"] - box["x_min"], box["y_max"] - box["y_min"]] for box in output["objects"]
        ]
    if item.reasoning is not None:
        output["reasoning"] = {
            "text": item.reasoning["text"],
            "grounding": item.reasoning["grounding"],
        }
    return {
        "skill": item.skill,
        "finish_reason": item.finish_reason,
        "output": output,
        "answer_tokens": item.tokens,
        "thinking_tokens": item.reasoning["tokens"] if item.reasoning is not None else [],
        "has_answer_separator": item.reasoning is not None,
        "coords": item.coords,
        "sizes": sizes,
        "logprobs": item.logprobs,
        "signature": item.signature,
    }


def step_report_json(report: StepReport) -> dict[str, Any]:
    """A train step's answer in this dialect."""
    return {
        "step": report.step,
        "applied": report.applied,
        "kl": report.stats.kl,
        # The reference policy has no mixture-of-experts router.
        "router_kl": None,
        "grad_norm": report.stats.grad_norm,
        "sft_loss": report.stats.sft_loss,
        "reward_mean": report.reward_mean,
        "reward_std": report.reward_std,
    }


router = APIRouter(prefix=PREFIX)
"""This dialect's own routes; ``/rollouts`` and ``/train_step`` are in ``routes_shared``."""


def _finetunes(request: Request) -> Finetunes:
    finetunes: Finetunes = request.app.state.finetunes
    return finetunes


@router.post("/finetunes")
async def create_finetune(request: Request) -> dict[str, Any]:
    """``POST /finetunes``: the caller's finetune of that name, created if new."""
    _, owner = authenticated(request)
    body = await parse_body(request, _CreateFinetune)
    record = await _finetunes(request).create(owner, body.name, body.rank)
    return {"finetune_id": record.adapter_id}


@router.get("/finetunes")
async def list_finetunes(request: Request) -> dict[str, Any]:
    """``GET /finetunes``: one page of the caller's finetunes, oldest first."""
    page = adapters_page(request)
    return {
        "finetunes": [finetune_json(record) for record in page.records],
        "next_cursor": page.next_cursor,
        "has_more": page.more,
    }


@router.get("/finetunes/{finetune_id}")
async def get_finetune(finetune_id: str, request: Request) -> dict[str, Any]:
    """``GET /finetunes/{id}``."""
    service, owner = authenticated(request)
    return {"finetune": finetune_json(await service.read_adapter(owner, finetune_id))}


@router.delete("/finetunes/{finetune_id}")
async def delete_finetune(finetune_id: str, request: Request) -> dict[str, Any]:
    """``DELETE /finetunes/{id}``, with its checkpoints; idempotent."""
    _, owner = authenticated(request)
    await _finetunes(request).delete(owner, finetune_id)
    return {"ok": True}


@router.post("/finetunes/{finetune_id}/metrics")
async def log_metrics(finetune_id: str, request: Request) -> dict[str, Any]:
    """``POST /finetunes/{id}/metrics``."""
    service, owner = authenticated(request)
    body = await parse_body(request, _Metrics)
    count = service.log_metrics(owner, finetune_id, body.step, body.metrics)
    return {"ok": True, "step": body.step, "logged_count": count}


@router.get("/finetunes/{finetune_id}/metrics")
async def read_metrics(finetune_id: str, request: Request) -> dict[str, Any]:
    """``GET /finetunes/{id}/metrics``: every metric logged, by step then name."""
    service, owner = authenticated(request)
    return {"metrics": service.read_metrics(owner, finetune_id)}


@router.get("/finetunes/{finetune_id}/checkpoints")
async def list_checkpoints(finetune_id: str, request: Request) -> dict[str, Any]:
    """``GET /finetunes/{id}/checkpoints``: one page, oldest first."""
    page = checkpoints_page(request, finetune_id)
    return {
        "checkpoints": [checkpoint_json(record, finetune_id) for record in page.records],
        "next_cursor": page.next_cursor,
        "has_more": page.more,
    }


@router.post("/finetunes/{finetune_id}/checkpoints/save")
async def save_checkpoint(finetune_id: str, request: Request) -> dict[str, Any]:
    """``POST /finetunes/{id}/checkpoints/save``: a checkpoint at the current step."""
    service, owner = authenticated(request)
    record = await service.save_checkpoint(owner, finetune_id)
    return {"ok": True, "checkpoint": checkpoint_json(record, finetune_id)}


@router.delete("/finetunes/{finetune_id}/checkpoints/{step}")
async def delete_checkpoint(finetune_id: str, step: str, request: Request) -> dict[str, Any]:
    """``DELETE /finetunes/{id}/checkpoints/{step}``; idempotent."""
    _, owner = authenticated(request)
    _finetunes(request).delete_checkpoints_at_step(owner, finetune_id, check_step(step))
    return {"ok": True}


def install(app: FastAPI) -> None:
    """Add this dialect's own routes to ``app``, over its ``state.service``."""
    app.state.finetunes = Finetunes(app.state.service)
    app.include_router(router)
