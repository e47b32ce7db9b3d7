"""``/rollouts`` and ``/train_step``: one path in both dialects, told apart by the body.

A body naming ``finetune_id`` goes to the ``/finetunes`` dialect, one naming
``adapter_id`` to the ``/adapters`` dialect, if served; a body naming neither goes to
the first dialect served, whose validation then names the missing field.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response

from lightning_moondream.server import routes_adapters, routes_finetunes
from lightning_moondream.server.http_common import PREFIX, authenticated, json_body
from lightning_moondream.server.middleware import fail_after_train_step
from lightning_moondream.server.service import Service

RolloutsHandler = Callable[[Service, str, dict[str, Any]], Awaitable[Response]]
TrainStepHandler = Callable[[Service, str, dict[str, Any]], Awaitable[dict[str, Any]]]

_ROLLOUTS: dict[str, RolloutsHandler] = {
    "adapters": routes_adapters.rollouts,
    "finetunes": routes_finetunes.rollouts,
}
_TRAIN_STEPS: dict[str, TrainStepHandler] = {
    "adapters": routes_adapters.train_step,
    "finetunes": routes_finetunes.train_step,
}
_ID_FIELDS = {"finetunes": "finetune_id", "adapters": "adapter_id"}

router = APIRouter(prefix=PREFIX)


def dialect_of(request: Request, body: dict[str, Any]) -> str:
    """The dialect served that a body's id field names (else the first one served)."""
    served: tuple[str, ...] = request.app.state.dialects
    for dialect, id_field in _ID_FIELDS.items():
        if id_field in body and dialect in served:
            return dialect
    return served[0]


@router.post("/rollouts")
async def rollouts(request: Request) -> Response:
    """``POST /rollouts`` in the dialect of its body."""
    service, owner = authenticated(request)
    body = await json_body(request)
    return await _ROLLOUTS[dialect_of(request, body)](service, owner, body)


@router.post("/train_step")
async def train_step(request: Request) -> dict[str, Any]:
    """``POST /train_step`` in the dialect of its body, then any after-step fault."""
    service, owner = authenticated(request)
    body = await json_body(request)
    answer = await _TRAIN_STEPS[dialect_of(request, body)](service, owner, body)
    fail_after_train_step(request, request.app.faults)
    return answer


def install(app: FastAPI) -> None:
    """Add ``/rollouts`` and ``/train_step`` to ``app``."""
    app.include_router(router)
