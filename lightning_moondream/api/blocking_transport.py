"""``BlockingTransport``: HTTP/1.1 for the blocking clients, with little work per request.

A blocking client sends each request on a thread of its own, and the threads take turns
on the GIL: the Python work one request costs delays the answers of all the others.
httpx's own transport (httpcore over h11) does much of that work: a pool walked, every
idle socket polled, at the start and end of each request, h11's checks of every event,
headers and body sent in two writes. Against a local service with no latency, the sync
inference client's ``detect`` cost about 0.64 ms of CPU per request over it (spread
over 8 pools), the official SDK's (urllib, a connection per request) about 0.32 ms.

This transport keeps idle connections in a list per origin, sends each request in one
write (up to ``WRITE_CHUNK`` bytes), reads answers with the standard library's
``http.client`` parser (about 40 us a request cheaper than h11 here) and times out with
the socket's own timeouts: the same ``detect`` then costs about 0.46 ms, and answers
sooner than the SDK's (1.21 ms a request against 1.28). It keeps httpx's
defaults: at most ``max_connections`` requests in flight (one connection each),
``max_keepalive`` idle connections kept for ``keepalive_expiry`` seconds, TLS with
httpx's certificates, httpx's exceptions.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator

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

READ_CHUNK = 64 * 1024
"""Most bytes of an answer's body read at once."""


def _head(request: httpx.Request) -> bytes:
    """The request line and headers, as sent.

    Raises:
        httpx.LocalProtocolError: If a header or the method holds a line break, which
            would end its line early and smuggle in another.
    """
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    lines.extend(name + b": " + value for name, value in request.headers.raw)
    lines.append(b"\r\n")
    head = b"\r\n".join(lines)
    breaks = len(lines)
    if head.count(b"\n") != breaks or head.count(b"\r") != breaks:
        raise httpx.LocalProtocolError("a header or the method of the request holds a line break")
    return head


def _chunked(request: httpx.Request) -> bool:
    """Whether the body goes in chunks (httpx says so for a body of unknown length)."""
    return "Transfer-Encoding" in request.headers


def _read_failed(exc: OSError | http.client.HTTPException) -> httpx.TransportError:
    """The httpx exception for one raised while reading an answer."""
    if isinstance(exc, TimeoutError):
        return httpx.ReadTimeout("timed out reading the answer")
    if isinstance(exc, http.client.RemoteDisconnected):
        return httpx.RemoteProtocolError("Server disconnected without sending a response.")
    if isinstance(exc, http.client.IncompleteRead):
        return httpx.RemoteProtocolError(f"Server disconnected mid-answer: {exc!r}")
    if isinstance(exc, http.client.HTTPException):
        return httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}")
    return httpx.ReadError(f"{type(exc).__name__}: {exc}")


class _Connection:
    """One HTTP/1.1 connection: its socket, and when it last became idle."""

    __slots__ = ("idle_since", "origin", "sock", "timeout")

    def __init__(self, origin: Origin, sock: socket.socket) -> None:
        self.origin = origin
        self.sock = sock
        self.timeout = sock.gettimeout()
        self.idle_since = 0.0

    def send(
        self, request: httpx.Request, timeouts: dict[str, float | None]
    ) -> http.client.HTTPResponse:
        """Send a request and read its answer's head.

        Raises:
            httpx.TransportError: The request could not be sent or its answer read.
        """
        self._write(request, timeouts.get("write"))
        self._set_timeout(timeouts.get("read"))
        response = http.client.HTTPResponse(self.sock, method=request.method)
        try:
            response.begin()  # skips 100 Continue
        except (OSError, http.client.HTTPException) as exc:
            response.close()
            raise _read_failed(exc) from exc
        return response

    def close(self) -> None:
        """Close the socket (at once, unless an answer's reader still holds it)."""
        self.sock.close()

    def _write(self, request: httpx.Request, timeout: float | None) -> None:
        assert isinstance(request.stream, httpx.SyncByteStream)
        chunked = _chunked(request)
        pending = [_head(request)]
        size = len(pending[0])
        self._set_timeout(timeout)
        try:
            for chunk in request.stream:
                if chunked and chunk:
                    chunk = b"%x\r\n%s\r\n" % (len(chunk), chunk)
                pending.append(chunk)
                size += len(chunk)
                if size >= WRITE_CHUNK:
                    self.sock.sendall(b"".join(pending))
                    pending, size = [], 0
            if chunked:
                pending.append(b"0\r\n\r\n")
            self.sock.sendall(b"".join(pending))
        except TimeoutError as exc:
            raise httpx.WriteTimeout("timed out sending the request") from exc
        except OSError as exc:
            raise httpx.WriteError(f"{type(exc).__name__}: {exc}") from exc

    def _set_timeout(self, timeout: float | None) -> None:
        if timeout != self.timeout:
            self.sock.settimeout(timeout)
            self.timeout = timeout


class _Body(httpx.SyncByteStream):
    """An answer's body, read as it arrives; closing it frees its connection."""

    def __init__(
        self,
        transport: BlockingTransport,
        connection: _Connection,
        response: http.client.HTTPResponse,
    ) -> None:
        self._transport = transport
        self._connection: _Connection | None = connection
        self._response = response
        self._complete = False

    def __iter__(self) -> Iterator[bytes]:
        if self._connection is None:
            raise httpx.StreamClosed()
        response = self._response
        try:
            while chunk := response.read1(READ_CHUNK):
                yield chunk
            if response.length:  # the stream ended short of the length given
                raise http.client.IncompleteRead(b"", response.length)
            response.read()  # at the end of a body of given length: lets go of the socket
        except (OSError, http.client.HTTPException) as exc:
            raise _read_failed(exc) from exc
        self._complete = True

    def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            self._response.close()  # an answer not read to its end still holds the socket
            reusable = self._complete and not self._response.will_close
            self._transport._finished(connection, reusable=reusable)


class BlockingTransport(httpx.BaseTransport):
    """HTTP/1.1 over blocking sockets, for ``httpx.Client``; safe to share between threads.

    Args:
        max_connections: Requests in flight at once; more wait for a free one, first
            come first served, at most the request's ``pool`` timeout.
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
        self._lock = threading.Lock()  # held only while a list or count changes
        self._idle: dict[Origin, list[_Connection]] = {}
        self._idle_count = 0
        self._in_flight = 0
        self._queue: deque[threading.Lock] = deque()
        self._closed = False

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet closed."""
        return self._in_flight

    @property
    def idle(self) -> int:
        """Idle connections kept for reuse."""
        return self._idle_count

    @property
    def waiting(self) -> int:
        """Requests waiting for their turn."""
        return len(self._queue)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send the request on an idle connection to its origin, or a new one."""
        origin = origin_of(request.url)
        timeouts = request.extensions.get("timeout", {})
        self._take_turn(timeouts.get("pool"))
        connection: _Connection | None = None
        try:
            connection = self._reuse(origin) or self._connect(origin, timeouts.get("connect"))
            response = connection.send(request, timeouts)
        except BaseException:
            if connection is not None:
                connection.close()
            self._end_turn()
            raise
        return httpx.Response(
            response.status,
            headers=[
                (name.encode("latin-1"), value.encode("latin-1"))
                for name, value in response.msg.raw_items()
            ],
            stream=_Body(self, connection, response),
            extensions={
                "http_version": b"HTTP/1.1" if response.version == 11 else b"HTTP/1.0",
                "reason_phrase": response.reason.encode("latin-1"),
            },
        )

    def close(self) -> None:
        """Close the idle connections; those in use close when their answer is closed."""
        with self._lock:
            self._closed = True
            idle = [connection for connections in self._idle.values() for connection in connections]
            self._idle.clear()
            self._idle_count = 0
        for connection in idle:
            connection.close()

    # Turns: requests in flight ------------------------------------------------------------

    def _take_turn(self, timeout: float | None) -> None:
        """Wait until fewer than ``max_connections`` requests are in flight, first come first.

        Raises:
            httpx.PoolTimeout: If no turn came within ``timeout`` seconds.
        """
        with self._lock:
            if self._in_flight < self._settings.max_connections and not self._queue:
                self._in_flight += 1
                return
            turn = threading.Lock()  # released by the request that hands its turn over
            turn.acquire()
            self._queue.append(turn)
        try:
            handed = turn.acquire(timeout=-1 if timeout is None else timeout)
        except BaseException:
            if not self._leave_queue(turn):
                self._end_turn()  # handed over just as the wait was interrupted: pass it on
            raise
        if not handed and self._leave_queue(turn):
            raise httpx.PoolTimeout("timed out waiting for a connection")

    def _leave_queue(self, turn: threading.Lock) -> bool:
        """Take a waiting request out of the queue; ``False`` if its turn came first."""
        with self._lock:
            try:
                self._queue.remove(turn)
            except ValueError:
                return False
            return True

    def _end_turn(self) -> None:
        with self._lock:
            self._pass_turn()

    def _pass_turn(self) -> None:
        """Hand the finished request's turn to the first waiting one, else give it back.

        The lock is held by the caller.
        """
        if self._queue:
            self._queue.popleft().release()
        else:
            self._in_flight -= 1

    # Connections --------------------------------------------------------------------------

    def _reuse(self, origin: Origin) -> _Connection | None:
        """The most recently idle connection to ``origin`` still fit to send on, if any."""
        while True:
            with self._lock:
                connections = self._idle.get(origin)
                if not connections:
                    return None
                connection = connections.pop()
                self._idle_count -= 1
            fresh = time.monotonic() - connection.idle_since < self._settings.keepalive_expiry
            # Bytes or the end of the stream on an idle connection: the server closed it,
            # and the next request would fail after being sent.
            if fresh and not readable(connection.sock):
                return connection
            connection.close()

    def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        address = (origin.host, origin.port)
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection(address, timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if origin.scheme == "https":
                sock = self._settings.tls().wrap_socket(sock, server_hostname=origin.host)
        except OSError as exc:
            if sock is not None:
                sock.close()
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout(f"timed out connecting to {origin.host}") from exc
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}") from exc
        return _Connection(origin, sock)

    def _finished(self, connection: _Connection, *, reusable: bool) -> None:
        """Keep a connection whose answer was read to the end; close any other."""
        with self._lock:
            keep = reusable and not self._closed and self._idle_count < self._settings.max_keepalive
            if keep:
                connection.idle_since = time.monotonic()
                self._idle.setdefault(connection.origin, []).append(connection)
                self._idle_count += 1
            self._pass_turn()
        if not keep:
            connection.close()
