"""``AsyncioTransport``: HTTP/1.1 for the async clients, with little work per request.

An async client runs every request it has in flight on one event loop thread, so the
loop's time per request is spent one request after another, and an answer that arrives
while the loop is busy waits. httpx's own async transport (httpcore over anyio) takes
much of that time: cancel scopes around every read and write, pool locks and events,
a pool walked at the start and end of each request, headers and body sent in two
writes. With 8 requests in flight at 50 ms of latency on two cores, the async inference
client spent about 1.7 ms of the loop per request and reached 0.85 to 0.89 of what the
latency allows, less when other processes took the cores (``benchmarks/bench_inference.py``).

This transport reads through an asyncio protocol, parses with h11 (as httpcore does),
sends each request in one write, keeps idle connections in a list per origin, and times
out with timers on the loop, not tasks: the same client then spends about 0.9 ms per
request and reaches 0.93. It keeps httpx's defaults: at most ``max_connections``
requests in flight (one connection each), ``max_keepalive`` idle connections kept for
``keepalive_expiry`` seconds, TLS with httpx's certificates, httpx's exceptions.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

import h11
import httpx

from lightning_moondream.api.http11 import (
    KEEPALIVE_EXPIRY,
    MAX_CONNECTIONS,
    MAX_KEEPALIVE,
    WRITE_CHUNK,
    ConnectionSettings,
    Origin,
    origin_of,
    readable,
)

MAX_INCOMPLETE_EVENT_SIZE = 100 * 1024
"""Bytes of a response head h11 buffers before giving up on it (httpcore's bound)."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: h11's state, and the waits of the request on it."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_INCOMPLETE_EVENT_SIZE)
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._closed = False
        self._paused = False
        self._waiter: asyncio.Future[bool] | None = None

    # asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.h11.receive_data(data)
        self._wake()

    def eof_received(self) -> bool:
        self._end_of_stream()
        return False  # close the transport: nothing more is sent on a half-closed one

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._end_of_stream()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    # One request --------------------------------------------------------------------------

    @property
    def reusable(self) -> bool:
        """Whether an idle connection is still open and nothing arrived on it since."""
        if self._closed or self.transport is None or self.transport.is_closing():
            return False
        if self.h11.their_state is not h11.IDLE or self.h11.trailing_data[0]:
            return False
        # The loop may not have read the server's close yet: a stale connection would
        # fail the next request after sending it.
        sock = self.transport.get_extra_info("socket")
        return sock is None or not readable(sock)

    async def send(self, request: httpx.Request, timeouts: dict[str, float | None]) -> h11.Response:
        """Send a request and read its answer's head.

        Raises:
            httpx.TransportError: The request could not be sent or its answer read.
        """
        assert self.transport is not None
        assert isinstance(request.stream, httpx.AsyncByteStream)
        write_timeout = timeouts.get("write")
        pending = [
            self._h11_send(
                h11.Request(
                    method=request.method,
                    target=request.url.raw_path,
                    headers=request.headers.raw,
                )
            )
        ]
        size = len(pending[0])
        async for chunk in request.stream:
            pending.append(self._h11_send(h11.Data(data=chunk)))
            size += len(chunk)
            if size >= WRITE_CHUNK:
                await self._write(b"".join(pending), write_timeout)
                pending, size = [], 0
        pending.append(self._h11_send(h11.EndOfMessage()))
        await self._write(b"".join(pending), write_timeout)
        event = await self.next_event(timeouts.get("read"))
        while isinstance(event, h11.InformationalResponse):  # 100 Continue, ...
            event = await self.next_event(timeouts.get("read"))
        assert isinstance(event, h11.Response)  # h11 gives nothing else before a head
        return event

    async def next_event(self, timeout: float | None) -> h11.Event:
        """The next part of the answer: its head, a piece of its body or its end.

        Raises:
            httpx.ReadTimeout: If nothing arrives for ``timeout`` seconds.
            httpx.RemoteProtocolError: If the server broke HTTP/1.1, or the connection
                closed mid-answer.
        """
        while True:
            state = self.h11.their_state
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                if state is h11.SEND_RESPONSE and self.h11.trailing_data == (b"", True):
                    message = "Server disconnected without sending a response."
                    raise httpx.RemoteProtocolError(message) from exc
                raise httpx.RemoteProtocolError(str(exc)) from exc
            if isinstance(event, h11.Event):
                return event
            # PAUSED comes only after the answer's end, which is never read past.
            assert event is h11.NEED_DATA
            await self._wait(timeout, httpx.ReadTimeout("timed out reading the answer"))

    def close(self) -> None:
        """Close the connection (at once: nothing it still had to send matters)."""
        if self.transport is not None:
            self.transport.abort()

    # Plumbing ----------------------------------------------------------------------------

    def _h11_send(self, event: h11.Event) -> bytes:
        try:
            return self.h11.send(event) or b""
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from exc

    async def _write(self, data: bytes, timeout: float | None) -> None:
        assert self.transport is not None
        if self._closed or self.transport.is_closing():
            raise httpx.WriteError("the connection closed before the request was sent")
        self.transport.write(data)
        while self._paused and not self._closed:
            await self._wait(timeout, httpx.WriteTimeout("timed out sending the request"))

    async def _wait(self, timeout: float | None, timed_out: httpx.TimeoutException) -> None:
        """Wait for data, the end of the stream or room to write; raise on timeout."""
        waiter: asyncio.Future[bool] = self.loop.create_future()
        self._waiter = waiter
        timer = None if timeout is None else self.loop.call_later(timeout, _settle, waiter, False)
        try:
            if not await waiter:
                raise timed_out
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        if self._waiter is not None:
            _settle(self._waiter, True)

    def _end_of_stream(self) -> None:
        self.h11.receive_data(b"")  # h11 then ends the answer, or says it is cut short
        self._wake()


def _settle(waiter: asyncio.Future[bool], woken: bool) -> None:
    if not waiter.done():
        waiter.set_result(woken)


class _Body(httpx.AsyncByteStream):
    """An answer's body, read as it arrives; closing it frees its connection."""

    def __init__(
        self, transport: AsyncioTransport, connection: _Connection, read_timeout: float | None
    ) -> None:
        self._transport = transport
        self._connection: _Connection | None = connection
        self._read_timeout = read_timeout
        self._complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            raise httpx.StreamClosed()
        while not self._complete:
            event = await connection.next_event(self._read_timeout)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._complete = True

    async def aclose(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            self._transport._finished(connection, complete=self._complete)


class AsyncioTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio connections, for ``httpx.AsyncClient``.

    Connections belong to the event loop that opened them and are reused and closed on
    it only: a client used on a new loop opens new ones, and leaves those of a loop
    already closed to the garbage collector.

    Args:
        max_connections: Requests in flight at once; more wait for a free one, at most
            the request's ``pool`` timeout.
        max_keepalive: Idle connections kept open for reuse.
        keepalive_expiry: Seconds an idle connection is kept.
    """

    def __init__(
        self,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_keepalive: int = MAX_KEEPALIVE,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
    ) -> None:
        self._settings = ConnectionSettings(max_connections, max_keepalive, keepalive_expiry)
        self._idle: dict[Origin, list[_Connection]] = {}
        self._in_flight = 0
        self._queue: deque[asyncio.Future[bool]] = deque()
        self._closed = False

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet closed."""
        return self._in_flight

    @property
    def idle(self) -> int:
        """Idle connections kept for reuse."""
        return sum(len(connections) for connections in self._idle.values())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send the request on an idle connection to its origin, or a new one."""
        origin = origin_of(request.url)
        timeouts = request.extensions.get("timeout", {})
        await self._take_turn(timeouts.get("pool"))
        connection: _Connection | None = None
        try:
            connection = self._reuse(origin) or await self._connect(origin, timeouts)
            event = await connection.send(request, timeouts)
        except BaseException:
            if connection is not None:
                connection.close()
            self._end_turn()
            raise
        return httpx.Response(
            event.status_code,
            headers=event.headers.raw_items(),
            stream=_Body(self, connection, timeouts.get("read")),
            extensions={
                "http_version": b"HTTP/" + event.http_version,
                "reason_phrase": event.reason,
            },
        )

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when their answer is closed."""
        self._closed = True
        loop = asyncio.get_running_loop()
        for connections in self._idle.values():
            for connection in connections:
                if connection.loop is loop:
                    connection.close()
        self._idle.clear()

    # Turns: requests in flight ------------------------------------------------------------

    async def _take_turn(self, timeout: float | None) -> None:
        """Wait until fewer than ``max_connections`` requests are in flight, first come first.

        Raises:
            httpx.PoolTimeout: If no turn came within ``timeout`` seconds.
        """
        if self._in_flight < self._settings.max_connections and not self._queue:
            self._in_flight += 1
            return
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[bool] = loop.create_future()
        self._queue.append(turn)
        timer = None if timeout is None else loop.call_later(timeout, _settle, turn, False)
        try:
            if not await turn:
                raise httpx.PoolTimeout("timed out waiting for a connection")
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.result():
                self._end_turn()  # handed over just as the wait was cancelled: pass it on
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _end_turn(self) -> None:
        """Hand the finished request's turn to the first waiting one, else give it back."""
        while self._queue:
            turn = self._queue.popleft()
            if not turn.done():
                turn.set_result(True)
                return
        self._in_flight -= 1

    # Connections --------------------------------------------------------------------------

    def _reuse(self, origin: Origin) -> _Connection | None:
        """The most recently idle connection to ``origin`` still fit to send on, if any."""
        connections = self._idle.get(origin)
        loop = asyncio.get_running_loop()
        while connections:
            connection = connections.pop()
            if connection.loop is not loop:
                continue  # another loop's: unusable here, and only closable there
            fresh = loop.time() - connection.idle_since < self._settings.keepalive_expiry
            if fresh and connection.reusable:
                return connection
            connection.close()
        return None

    async def _connect(self, origin: Origin, timeouts: dict[str, float | None]) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self._settings.tls() if origin.scheme == "https" else None
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(origin),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                ),
                timeouts.get("connect"),
            )
        except asyncio.TimeoutError as exc:
            raise httpx.ConnectTimeout(f"timed out connecting to {origin.host}") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}") from exc
        return connection

    def _finished(self, connection: _Connection, *, complete: bool) -> None:
        """Keep a connection whose answer was read to the end; close any other."""
        keep = (
            complete
            and not self._closed
            and connection.h11.our_state is h11.DONE
            and connection.h11.their_state is h11.DONE
            and self.idle < self._settings.max_keepalive
        )
        if keep:
            connection.h11.start_next_cycle()
            connection.idle_since = connection.loop.time()
            self._idle.setdefault(connection.origin, []).append(connection)
        else:
            connection.close()
        self._end_turn()
