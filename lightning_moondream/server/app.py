"""The local tuning service as an ASGI app, in one or both API dialects.

``create_app`` builds a FastAPI app serving ``/v1/tuning/...``: the spec's ``/adapters``
dialect (``routes_adapters``), Moondream's current ``/finetunes`` dialect
(``routes_finetunes``), or both over one store, so the same adapter is reachable
through either. ``/rollouts`` and ``/train_step`` have one path in both dialects; their
body tells them apart (``finetune_id`` or ``adapter_id``). Moondream's inference API
(``/v1/query``, ``/detect``, ``/point``, ``/caption``) answers from the base policy and
saved checkpoints (``routes_inference``). All set-up happens in
``create_app`` (no lifespan events), so the app also works in-process through
``httpx.ASGITransport``, which does not run them.

Errors are ``{"error": {"type": ..., "message": ...}}`` in both dialects, with 400
(unreadable body, image or cursor; tampered rollouts), 401, 404 (unknown ids and other
keys' ids alike), 409 (a ``/finetunes`` name taken at another rank), 413, 422
(invalid fields, named), 429, 500 and 503. An unknown route is FastAPI's 404.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from tempfile import TemporaryDirectory

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from lightning_moondream.images import DEFAULT_MAX_PIXELS
from lightning_moondream.server import (
    routes_adapters,
    routes_finetunes,
    routes_inference,
    routes_shared,
)
from lightning_moondream.server.engine import make_engine
from lightning_moondream.server.errors import ServiceError
from lightning_moondream.server.faults import FaultConfig, FaultInjector, check_latency
from lightning_moondream.server.http_common import error_response
from lightning_moondream.server.middleware import BodyLimit, LatencyAndFaults
from lightning_moondream.server.rate_limit import NoRateLimit, RateLimit, RateLimiter
from lightning_moondream.server.service import Service
from lightning_moondream.server.store import Store

DIALECTS: tuple[str, ...] = ("both", "adapters", "finetunes")
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DIALECTS", "TuningApp", "close_app", "create_app"]


class TuningApp(FastAPI):
    """FastAPI app with the service's middleware outside FastAPI's own.

    Outside, so that a dropped connection is really dropped, not turned into a 500 by
    FastAPI's error handler. From the outside in: latency and injected faults, the rate
    limit (so a request failed by injection does not count), then the body size limit.

    Attributes:
        latency: Least seconds to answer, per endpoint group.
        faults: The failures injected.
        rate_limiter: The per-key rate limit, if any.
        max_body_bytes: Largest request body accepted.
    """

    def __init__(
        self,
        *,
        latency: dict[str, float],
        faults: FaultInjector,
        rate_limiter: RateLimiter | None,
        max_body_bytes: int,
    ) -> None:
        super().__init__(
            title="lightning_moondream local tuning service", docs_url=None, redoc_url=None
        )
        self.latency = latency
        self.faults = faults
        self.rate_limiter = rate_limiter
        self.max_body_bytes = max_body_bytes

    def build_middleware_stack(self) -> ASGIApp:
        """FastAPI's stack wrapped in the service's middleware."""
        app: ASGIApp = BodyLimit(super().build_middleware_stack(), self.max_body_bytes)
        app = NoRateLimit(app) if self.rate_limiter is None else RateLimit(app, self.rate_limiter)
        return LatencyAndFaults(app, self.latency, self.faults)


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
    rate_limit: float | None = None,
    clock: Callable[[], float] = time.monotonic,
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
        rate_limit: Requests per second each API key may send, in bursts of
            ``max(1, ceil(rate_limit / 5))``; over it, 429 with ``Retry-After`` (see
            ``rate_limit``). ``None`` for no limit.
        clock: Monotonic seconds the rate limit refills by.

    Raises:
        ValueError: For an unknown policy, dialect or latency endpoint, a negative
            retention, an empty key set, or a rate limit that is not a positive number.
    """
    keys = _checked_options(dialect, checkpoint_retention, api_keys)
    app = TuningApp(
        latency=check_latency(latency),
        faults=FaultInjector(faults or FaultConfig()),
        rate_limiter=None if rate_limit is None else RateLimiter(rate_limit, clock),
        max_body_bytes=max_body_bytes,
    )
    store = Store(_data_dir(app, data_dir))
    app.state.service = Service(
        store, make_engine(policy), keys, max_pixels, seed, checkpoint_retention, owner_key
    )
    _install_error_handlers(app)
    _install_routes(app, ("adapters", "finetunes") if dialect == "both" else (dialect,))
    routes_inference.install(app, seed)
    return app


def _checked_options(
    dialect: str, checkpoint_retention: float | None, api_keys: Collection[str] | None
) -> list[str] | None:
    """Check ``create_app``'s options; the accepted keys, empty ones left out.

    Raises:
        ValueError: For an unknown dialect, a negative retention or an empty key set.
    """
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}, got {dialect!r}")
    if checkpoint_retention is not None and not checkpoint_retention >= 0:
        raise ValueError("checkpoint_retention must be a non-negative number of seconds or None")
    if api_keys is None:
        return None
    keys = [key for key in api_keys if key]
    if not keys:
        raise ValueError("api_keys is empty: give at least one key, or None to accept any key")
    return keys


def _data_dir(app: FastAPI, data_dir: str | Path | None) -> Path:
    """The data directory; a temporary one living as long as ``app`` if ``None``."""
    if data_dir is not None:
        return Path(data_dir)
    temporary = TemporaryDirectory(prefix="lightning-moondream-")
    app.state.temporary_dir = temporary
    return Path(temporary.name)


def _install_routes(app: FastAPI, dialects: tuple[str, ...]) -> None:
    """Serve the routes of ``dialects``, and the two paths they share."""
    app.state.dialects = dialects
    if "adapters" in dialects:
        routes_adapters.install(app)
    if "finetunes" in dialects:
        routes_finetunes.install(app)
    routes_shared.install(app)


def close_app(app: FastAPI) -> None:
    """Release what ``create_app`` opened: the database, and a temporary data folder."""
    app.state.service.store.close()
    temporary = getattr(app.state, "temporary_dir", None)
    if temporary is not None:
        temporary.cleanup()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))
