"""The ``/adapters`` dialect of the tuning API (the spec's), over the shared core.

Answers follow the spec: ``{}`` for deletes and train steps, ISO timestamps, string
checkpoint ids; adapters also report ``train_steps``. A train step takes an optional
``lr`` (the service's default otherwise).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from lightning_moondream.api.models import check_groups
from lightning_moondream.server.core import (
    PREFIX,
    ApiError,
    SampledRollout,
    Service,
    check_lr,
    decode_cursor,
    encode_cursor,
    page_limit,
    rollouts_response,
)


class _CreateAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(min_length=1, max_length=256)
    rank: StrictInt
    from_checkpoint: StrictStr | None = None


class _Rollouts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter_id: StrictStr
    num_rollouts: StrictInt
    request: dict[str, Any]
    ground_truth: dict[str, Any] | None = None


class _TrainStep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter_id: StrictStr
    groups: list[Any]
    lr: Any = None


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


def install(app: FastAPI, service: Service) -> None:
    """Add the ``/adapters`` dialect's own routes to ``app``.

    ``rollouts`` and ``train_step`` share their paths with the other dialect: the app
    routes them by body (see ``app.py``).
    """
    store = service.store

    @app.post(f"{PREFIX}/adapters")
    async def create_adapter(request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        body = await service.parse_body(request, _CreateAdapter)
        record = await service.create_adapter(owner, body.name, body.rank, body.from_checkpoint)
        return {"adapter_id": record.adapter_id}

    @app.get(f"{PREFIX}/adapters")
    async def list_adapters(request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        limit = page_limit(request)
        after = decode_cursor(request.query_params.get("cursor"))
        records, more = store.list_adapters(owner, limit, after)
        return {
            "adapters": [record.to_json() for record in records],
            "next_cursor": encode_cursor(records[-1].seq) if more else None,
        }

    @app.get(f"{PREFIX}/adapters/{{adapter_id}}")
    async def get_adapter(adapter_id: str, request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        return (await service.read_adapter(owner, adapter_id)).to_json()

    @app.delete(f"{PREFIX}/adapters/{{adapter_id}}")
    async def delete_adapter(adapter_id: str, request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        await service.delete_adapter(owner, adapter_id)
        return {}

    @app.post(f"{PREFIX}/adapters/{{adapter_id}}/checkpoint")
    async def save_checkpoint(adapter_id: str, request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        return (await service.save_checkpoint(owner, adapter_id)).to_json()

    @app.get(f"{PREFIX}/adapters/{{adapter_id}}/checkpoints")
    async def list_checkpoints(adapter_id: str, request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        limit = page_limit(request)
        after = decode_cursor(request.query_params.get("cursor"))
        service.get_adapter_or_404(owner, adapter_id)
        records, more = store.list_checkpoints(owner, adapter_id, limit, after)
        return {
            "checkpoints": [record.to_json() for record in records],
            "next_cursor": encode_cursor(records[-1].seq) if more else None,
        }

    @app.delete(f"{PREFIX}/adapters/{{adapter_id}}/checkpoints/{{checkpoint_id:path}}")
    async def delete_checkpoint(
        adapter_id: str, checkpoint_id: str, request: Request
    ) -> dict[str, Any]:
        owner = service.authenticate(request)
        # Short form "chk_001", or the full id "adapter/chk_001" (its slash raw or %2F).
        full_id = checkpoint_id if "/" in checkpoint_id else f"{adapter_id}/{checkpoint_id}"
        if not full_id.startswith(f"{adapter_id}/") or not store.delete_checkpoint(owner, full_id):
            raise ApiError(404, f"checkpoint {full_id!r} not found")
        return {}


async def rollouts(service: Service, owner: str, body: dict[str, Any]) -> Response:
    """Answer ``POST /rollouts`` in this dialect."""
    parsed = service.validate_body(body, _Rollouts)
    items, rewards = await service.sample_rollouts(
        owner, parsed.adapter_id, parsed.num_rollouts, parsed.request, parsed.ground_truth
    )
    return rollouts_response(parsed.request, items, rewards, rollout_json)


async def train_step(
    service: Service, owner: str, body: dict[str, Any], request: Request
) -> dict[str, Any]:
    """Answer ``POST /train_step`` in this dialect: RL groups, ``{}`` when applied."""
    parsed = service.validate_body(body, _TrainStep)
    lr = check_lr(parsed.lr)
    try:
        groups = check_groups(parsed.groups)
    except ValueError as exc:
        raise ApiError(422, str(exc)) from exc
    service.get_adapter_or_404(owner, parsed.adapter_id)
    verified = [
        service.verify_rl_group(parsed.adapter_id, f"groups[{index}]", group)
        for index, group in enumerate(groups)
    ]
    await service.train(owner, parsed.adapter_id, verified, [], lr)
    service.after_train_step(request)
    return {}
