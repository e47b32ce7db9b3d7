"""The local tuning service as an ASGI app, in one or both API dialects.

``create_app`` builds a FastAPI app serving ``/v1/tuning/...``: the spec's ``/adapters``
dialect (``routes_adapters``), Moondream's current ``/finetunes`` dialect
(``routes_finetunes``), or both over one store, so the same adapter is reachable
through either. ``/rollouts`` and ``/train_step`` have one path in both dialects; their
body tells them apart (``finetune_id`` or ``adapter_id``). All set-up happens in
``create_app`` (no lifespan events), so the app also works in-process through
``httpx.ASGITransport``, which does not run them.

Errors are ``{"error": {"type": ..., "message": ...}}`` in both dialects, with 400
(unreadable body, image or cursor; tampered rollouts), 401, 404 (unknown ids and other
keys' ids alike), 413, 422 (invalid fields, named), 429, 500 and 503. An unknown route
is FastAPI's 404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lightning_moondream.images import DEFAULT_MAX_PIXELS
from lightning_moondream.server import routes_adapters, routes_finetunes
from lightning_moondream.server.core import (
    DEFAULT_MAX_BODY_BYTES,
    PREFIX,
    ApiError,
    Service,
    TuningApp,
    error_response,
)
from lightning_moondream.server.engine import make_engine
from lightning_moondream.server.faults import FaultConfig, FaultInjector, check_latency
from lightning_moondream.server.store import Store

DIALECTS: tuple[str, ...] = ("both", "adapters", "finetunes")

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DIALECTS", "close_app", "create_app"]


def create_app(
    *,
    data_dir: str | Path | None = None,
    api_keys: Collection[str] | None = None,
    policy: str = "reference",
    latency: Mapping[str, float] | None = None,
    faults: FaultConfig | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    seed: int = 0,
    dialect: str = "both",
    checkpoint_retention: float | None = None,
    owner_key: str | None = None,
) -> FastAPI:
    """Build the local tuning service.

    Args:
        data_dir: Where adapters, checkpoints, metrics and the signing secret live; a
            temporary directory (removed with the app) if ``None``.
        api_keys: Accepted ``X-Moondream-Auth`` keys; ``None`` accepts any non-empty
            key, each key seeing only its own adapters.
        policy: ``"reference"`` (learning torch policy) or ``"constant"`` (no compute).
        latency: Least seconds an answer takes, per endpoint group (``"adapters"``,
            ``"checkpoints"``, ``"rollouts"``, ``"train_step"``); the service's own
            handling runs within it.
        faults: Failures to inject (none by default).
        max_body_bytes: Largest request body accepted (413 above).
        max_pixels: Largest decoded image accepted, in pixels (400 above).
        seed: Seed of sampling and adapter initialization order.
        dialect: ``"both"``, ``"adapters"`` or ``"finetunes"``: the API dialects served.
        checkpoint_retention: Seconds a checkpoint is kept, reported as its
            ``expires_at_ms``; ``None`` keeps checkpoints for ever.
        owner_key: Every accepted key acts for the owner of this key: the processes
            of a run share a fresh key, and their adapters stay those of this one.

    Raises:
        ValueError: For an unknown policy, dialect or latency endpoint, a negative
            retention, or an empty key set.
    """
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}, got {dialect!r}")
    if checkpoint_retention is not None and not checkpoint_retention >= 0:
        raise ValueError("checkpoint_retention must be a non-negative number of seconds or None")
    if api_keys is not None:
        api_keys = [key for key in api_keys if key]
        if not api_keys:
            raise ValueError("api_keys is empty: give at least one key, or None to accept any key")
    app = TuningApp(title="lightning_moondream local tuning service", docs_url=None, redoc_url=None)
    app.latency = check_latency(latency)
    app.faults = FaultInjector(faults or FaultConfig())
    if data_dir is None:
        temporary = TemporaryDirectory(prefix="lightning-moondream-")
        # The directory lives as long as the app object does.
        app.state.temporary_dir = temporary
        data_dir = temporary.name
    service = Service(
        Store(Path(data_dir)),
        make_engine(policy),
        api_keys,
        app.faults,
        max_body_bytes,
        max_pixels,
        seed,
        checkpoint_retention_ms=(
            None if checkpoint_retention is None else round(checkpoint_retention * 1000)
        ),
        owner_key=owner_key,
    )
    app.state.service = service
    _install_error_handlers(app)
    served = ("adapters", "finetunes") if dialect == "both" else (dialect,)
    if "adapters" in served:
        routes_adapters.install(app, service)
    if "finetunes" in served:
        routes_finetunes.install(app, service)
    _install_shared_routes(app, service, served)
    return app


def close_app(app: FastAPI) -> None:
    """Release what ``create_app`` opened: the database, and a temporary data folder."""
    app.state.service.store.close()
    temporary = getattr(app.state, "temporary_dir", None)
    if temporary is not None:
        temporary.cleanup()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))


_DIALECT_MODULES = {"adapters": routes_adapters, "finetunes": routes_finetunes}


def _install_shared_routes(app: FastAPI, service: Service, served: tuple[str, ...]) -> None:
    """``/rollouts`` and ``/train_step``: one path, handled by the dialect of the body."""

    def dialect_of(body: dict[str, Any]) -> Any:
        # A body naming neither id goes to the first dialect served, whose validation
        # then names the missing field.
        if "finetune_id" in body and "finetunes" in served:
            return routes_finetunes
        if "adapter_id" in body and "adapters" in served:
            return routes_adapters
        return _DIALECT_MODULES[served[0]]

    @app.post(f"{PREFIX}/rollouts")
    async def rollouts(request: Request) -> Response:
        owner = service.authenticate(request)
        body = await service.json_body(request)
        handler: Callable[..., Awaitable[Response]] = dialect_of(body).rollouts
        return await handler(service, owner, body)

    @app.post(f"{PREFIX}/train_step")
    async def train_step(request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        body = await service.json_body(request)
        handler: Callable[..., Awaitable[dict[str, Any]]] = dialect_of(body).train_step
        return await handler(service, owner, body, request)
