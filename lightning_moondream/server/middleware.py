"""ASGI middleware of the local service: injected latency and faults, body size limit.

The app (``app.TuningApp``) puts these outside FastAPI's own middleware, so that a
dropped connection is really dropped, not turned into a 500 by its error handler.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import anyio
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lightning_moondream.server.errors import ServiceError
from lightning_moondream.server.faults import DroppedConnection, FaultInjector, endpoint_of
from lightning_moondream.server.http_common import error_response

DROP = "lightning_moondream.drop"
"""Scope key a handler sets to have its connection dropped instead of answered."""


class HTTPMiddleware(ABC):
    """Middleware acting on HTTP requests; any other connection goes straight to the app.

    Args:
        app: The app to wrap.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    @abstractmethod
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request."""


class LatencyAndFaults(HTTPMiddleware):
    """Least answer times and injected failures, per endpoint group.

    Latency is the least time an answer takes from the request's arrival: the handler
    runs at once and its answer is held until then, so the service's own work falls
    within the latency, as a remote service's would, and a lone request takes exactly
    the latency. Failures drawn before the handler never change state.

    Args:
        app: The app to wrap.
        latency: Least seconds to answer, per endpoint group.
        faults: The failures to draw.
    """

    def __init__(self, app: ASGIApp, latency: dict[str, float], faults: FaultInjector) -> None:
        super().__init__(app)
        self.latency = latency
        self.faults = faults

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request, its answer held until its latency has passed."""
        endpoint = endpoint_of(scope["path"])
        answer_at = anyio.current_time() + (self.latency.get(endpoint, 0.0) if endpoint else 0.0)
        # Let requests sent together all arrive, and start their latency, before any is
        # handled: in process, handling one would otherwise hold up the client's next sends.
        await anyio.sleep(0)
        fault = self.faults.before(endpoint) if endpoint is not None else None
        if fault is not None:
            await _sleep_until(answer_at)
            if fault == "drop":
                await _drop(send)
            headers = {"Retry-After": str(self.faults.config.retry_after)} if fault == "429" else {}
            response = error_response(int(fault), f"injected failure ({fault})", headers)
            await response(scope, receive, send)
            return

        async def held_send(message: Message) -> None:
            # A handler that asked for a drop has acted; its response must not go out.
            if scope.get(DROP):
                return
            if message["type"] == "http.response.start":
                await _sleep_until(answer_at)
            await send(message)

        await self.app(scope, receive, held_send)
        if scope.get(DROP):
            await _sleep_until(answer_at)
            await _drop(send)


def fail_after_train_step(request: Request, faults: FaultInjector) -> None:
    """Inject the configured failure of an applied train step, if one is drawn.

    Raises:
        ServiceError: 500 when the drawn failure is an error answer.
    """
    failure = faults.after_train_step()
    if failure == "drop":
        request.scope[DROP] = True
    elif failure is not None:
        raise ServiceError(500, "injected failure after the train step was applied")


async def _sleep_until(deadline: float) -> None:
    delay = deadline - anyio.current_time()
    if delay > 0:
        await anyio.sleep(delay)


async def _drop(send: Send) -> None:
    # Start a response, then fail: uvicorn then closes the connection mid-response
    # (before the start, it would answer a clean 500 instead).
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    raise DroppedConnection("connection dropped by fault injection")


class BodyLimit(HTTPMiddleware):
    """Refuse request bodies larger than a limit, with a 413, as the handler reads them.

    The limit is checked when the handler first reads the body, so a request refused
    for another reason first (a missing key, say) is refused for that one. A declared
    ``Content-Length`` over the limit is refused before any byte is read.

    Args:
        app: The app to wrap.
        max_body_bytes: Largest request body accepted.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        super().__init__(app)
        self.max_body_bytes = max_body_bytes

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request, counting the bytes of its body."""
        declared = dict(scope["headers"]).get(b"content-length", b"")
        size = 0

        async def limited_receive() -> Message:
            nonlocal size
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                raise self._too_large()
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.max_body_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> ServiceError:
        return ServiceError(413, f"request body exceeds {self.max_body_bytes} bytes")
