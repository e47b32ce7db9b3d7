"""httpx transports that call an ASGI app in this process, with no port and no socket.

``httpx.ASGITransport`` serves async clients only, and lets exceptions of the app
propagate as they are. These transports make the in-process local service behave like a
server across a network: an exception inside the app reaches the client as a dropped
connection (``httpx.RemoteProtocolError``), and a synchronous client is served through a
background event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from lightning_moondream.api.loop import BackgroundLoop

ASGIApp = Any


class InProcessAsyncTransport(httpx.AsyncBaseTransport):
    """Async transport to an ASGI app in this process.

    Args:
        app: The ASGI app.
        on_close: Called once when the transport closes, to release the app.
    """

    def __init__(self, app: ASGIApp, on_close: Callable[[], None] | None = None) -> None:
        self._transport = httpx.ASGITransport(app=app)
        self._on_close = on_close

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send a request to the app; an exception inside it is a dropped connection."""
        try:
            return await self._transport.handle_async_request(request)
        except Exception as exc:
            raise httpx.RemoteProtocolError(
                f"the in-process service dropped the connection ({type(exc).__name__})",
                request=request,
            ) from exc

    async def aclose(self) -> None:
        """Release the app, if this transport was given a way to."""
        self.close_app()

    def close_app(self) -> None:
        """Run ``on_close`` once."""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


class InProcessTransport(httpx.BaseTransport):
    """Sync transport to an ASGI app in this process, run on a background event loop."""

    def __init__(
        self,
        app: ASGIApp,
        loop: BackgroundLoop | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._inner = InProcessAsyncTransport(app, on_close)
        self._owns_loop = loop is None
        self._loop = loop or BackgroundLoop(name="lightning-moondream-local-service")

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send a request to the app and wait for the whole answer."""

        async def send() -> tuple[int, httpx.Headers, bytes]:
            response = await self._inner.handle_async_request(request)
            return response.status_code, response.headers, await response.aread()

        status, headers, content = self._loop.run(send())
        return httpx.Response(status, headers=headers, content=content, request=request)

    def close(self) -> None:
        """Release the app, and stop the background loop if this transport started it."""
        self._inner.close_app()
        if self._owns_loop:
            self._loop.close()
