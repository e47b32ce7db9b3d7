"""httpx transports that call an ASGI app in this process, with no port and no socket.

They make the in-process local service behave like a server across a network: an
exception inside the app reaches the client as a dropped connection
(``httpx.RemoteProtocolError``), and a synchronous client is served through a
background event loop. ``httpx.ASGITransport`` does neither, and tries to import
``sniffio`` on every request, which costs more than the rest of the bridge when it is
not installed.
"""

from __future__ import annotations

import asyncio
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
        self._app = app
        self._on_close = on_close

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send a request to the app; an exception inside it is a dropped connection."""
        url = request.url
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(name.lower(), value) for name, value in request.headers.raw],
            "scheme": url.scheme,
            "path": url.path,
            "raw_path": url.raw_path.split(b"?")[0],
            "query_string": url.query,
            "server": (url.host, url.port),
            "client": ("127.0.0.1", 123),
            "root_path": "",
        }
        body = await request.aread()
        body_sent = False
        answered = asyncio.Event()
        start: dict[str, Any] = {}
        parts: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if body_sent:
                await answered.wait()
                return {"type": "http.disconnect"}
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))
                if not message.get("more_body", False):
                    answered.set()

        try:
            await self._app(scope, receive, send)
        except Exception as exc:
            raise httpx.RemoteProtocolError(
                f"the in-process service dropped the connection ({type(exc).__name__})",
                request=request,
            ) from exc
        finally:
            answered.set()
        if not start:
            raise httpx.RemoteProtocolError(
                "the in-process service closed without answering", request=request
            )
        return httpx.Response(
            start["status"], headers=start.get("headers", []), content=b"".join(parts)
        )

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
