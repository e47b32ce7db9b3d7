"""The ``/finetunes`` dialect of the tuning API (Moondream's current SDK), over the core.

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
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from lightning_moondream.server.core import (
    PREFIX,
    ApiError,
    SampledRollout,
    Service,
    check_lr,
    is_finite_number,
    next_cursor,
    page_query,
)
from lightning_moondream.server.store import AdapterRecord, CheckpointRecord

MAX_METRICS = 1000
"""Most metrics one call may log."""


class _CreateFinetune(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(min_length=1, max_length=256)
    rank: StrictInt


class _Rollouts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    finetune_id: StrictStr
    num_rollouts: StrictInt
    request: dict[str, Any]
    ground_truth: dict[str, Any] | None = None


class _TrainStep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    finetune_id: StrictStr
    groups: list[Any] = Field(min_length=1)
    lr: Any = None


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


def _checked_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    checked = {}
    for name, value in metrics.items():
        if not name.strip() or len(name) > 256:
            raise ApiError(422, f"metrics: names must be 1 to 256 characters, got {name!r}")
        if not is_finite_number(value):
            raise ApiError(422, f"metrics.{name}: must be a finite number, got {value!r}")
        checked[name] = float(value)
    return checked


def _step_of(raw: str) -> int:
    if not raw.isdigit():
        raise ApiError(422, f"step: must be a non-negative integer, got {raw!r}")
    return int(raw)


def install(app: FastAPI, service: Service) -> None:
    """Add the ``/finetunes`` dialect's own routes to ``app``.

    ``rollouts`` and ``train_step`` share their paths with the other dialect: the app
    routes them by body (see ``app.py``).
    """
    store = service.store

    @app.post(f"{PREFIX}/finetunes")
    async def create_finetune(request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        body = await service.parse_body(request, _CreateFinetune)
        record = await service.create_adapter(owner, body.name, body.rank)
        return {"finetune_id": record.adapter_id}

    @app.get(f"{PREFIX}/finetunes/{{finetune_id}}")
    async def get_finetune(finetune_id: str, request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        return {"finetune": finetune_json(await service.read_adapter(owner, finetune_id))}

    @app.delete(f"{PREFIX}/finetunes/{{finetune_id}}")
    async def delete_finetune(finetune_id: str, request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        await service.delete_adapter(owner, finetune_id)
        return {}

    @app.post(f"{PREFIX}/finetunes/{{finetune_id}}/metrics")
    async def log_metrics(finetune_id: str, request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        body = await service.parse_body(request, _Metrics)
        metrics = _checked_metrics(body.metrics)
        service.get_adapter_or_404(owner, finetune_id)
        count = store.log_metrics(finetune_id, body.step, metrics)
        return {"ok": True, "step": body.step, "logged_count": count}

    @app.get(f"{PREFIX}/finetunes/{{finetune_id}}/metrics")
    async def read_metrics(finetune_id: str, request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        service.get_adapter_or_404(owner, finetune_id)
        return {"metrics": store.list_metrics(finetune_id)}

    @app.get(f"{PREFIX}/finetunes/{{finetune_id}}/checkpoints")
    async def list_checkpoints(finetune_id: str, request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        limit, after = page_query(request)
        service.get_adapter_or_404(owner, finetune_id)
        records, more = store.list_checkpoints(owner, finetune_id, limit, after)
        return {
            "checkpoints": [checkpoint_json(record, finetune_id) for record in records],
            "next_cursor": next_cursor(records, more),
            "has_more": more,
        }

    @app.post(f"{PREFIX}/finetunes/{{finetune_id}}/checkpoints/save")
    async def save_checkpoint(finetune_id: str, request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        record = await service.save_checkpoint(owner, finetune_id)
        return {"ok": True, "checkpoint": checkpoint_json(record, finetune_id)}

    @app.delete(f"{PREFIX}/finetunes/{{finetune_id}}/checkpoints/{{step}}")
    async def delete_checkpoint(finetune_id: str, step: str, request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        number = _step_of(step)
        service.get_adapter_or_404(owner, finetune_id)
        deleted = 0
        while (record := store.checkpoint_at_step(owner, finetune_id, number)) is not None:
            deleted += store.delete_checkpoint(owner, record.checkpoint_id)
        if not deleted:
            raise ApiError(404, f"no checkpoint of finetune {finetune_id!r} at step {number}")
        return {"ok": True}


async def rollouts(service: Service, owner: str, body: dict[str, Any]) -> Response:
    """Answer ``POST /rollouts`` in this dialect."""
    parsed = service.validate_body(body, _Rollouts)
    return await service.rollouts(owner, parsed.finetune_id, parsed, rollout_json)


async def train_step(
    service: Service, owner: str, body: dict[str, Any], request: Request
) -> dict[str, Any]:
    """Answer ``POST /train_step`` in this dialect: RL and SFT groups, the step's report."""
    parsed = service.validate_body(body, _TrainStep)
    lr = check_lr(parsed.lr)
    report = await service.train_step(owner, parsed.finetune_id, parsed.groups, lr, request)
    return report.to_json()
