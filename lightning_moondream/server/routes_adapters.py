"""The ``/adapters`` dialect of the tuning API (the spec's), over the shared core.

Answers follow the spec: ``{}`` for deletes and train steps, ISO timestamps, string
checkpoint ids. Train steps take RL groups only, as in the spec. Two extensions:
adapters also report ``train_steps``, and a train step takes an optional ``lr``, which
the spec does not have: checked and honoured as on ``/finetunes`` (absent: the service's
default; at 0 nothing changes), while the answer stays ``{}``. The client does not send
``lr`` in this dialect.
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
    next_cursor,
    page_query,
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
    # Beyond the spec: see the module docstring.
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
        records, more = store.list_adapters(owner, *page_query(request))
        return {
            "adapters": [record.to_json() for record in records],
            "next_cursor": next_cursor(records, more),
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
        limit, after = page_query(request)
        service.get_adapter_or_404(owner, adapter_id)
        records, more = store.list_checkpoints(owner, adapter_id, limit, after)
        return {
            "checkpoints": [record.to_json() for record in records],
            "next_cursor": next_cursor(records, more),
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
    return await service.rollouts(owner, parsed.adapter_id, parsed, rollout_json)


async def train_step(
    service: Service, owner: str, body: dict[str, Any], request: Request
) -> dict[str, Any]:
    """Answer ``POST /train_step`` in this dialect: RL groups, ``{}`` when applied."""
    parsed = service.validate_body(body, _TrainStep)
    lr = check_lr(parsed.lr)
    # Checked as the client checks them, before the adapter lookup: SFT groups are
    # refused with a message naming /finetunes, and a malformed step is a 422 even for
    # an unknown adapter.
    try:
        groups = check_groups(parsed.groups)
    except ValueError as exc:
        raise ApiError(422, str(exc)) from exc
    await service.train_step(owner, parsed.adapter_id, groups, lr, request)
    return {}
