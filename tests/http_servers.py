"""Small HTTP/1.1 servers on 127.0.0.1 for the transport tests, written as each test needs.

Each server is a few lines of asyncio that read requests and answer them, including the
ways real servers misbehave: closing idle connections, closing instead of answering,
never answering. ``listening`` runs one in the caller's event loop (for async clients),
``listening_in_thread`` on a loop of its own thread (for blocking clients).
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path


class Exchange:
    """One connection as the server sees it: read requests, write answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self) -> bytes | None:
        """The next request's body, or ``None`` once the client closed the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return await self.reader.readexactly(length)

    async def answer(self, body: bytes, *headers: str) -> None:
        lines = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *headers, "", ""]
        self.writer.write("\r\n".join(lines).encode() + body)
        await self.writer.drain()


Handler = Callable[[Exchange], Awaitable[None]]


@dataclass
class Server:
    """A running test server.

    Attributes:
        url: Where it listens.
        ports: The client port of each connection it took, in order.
        closed: Released once per connection it has closed.
    """

    url: str
    ports: list[int] = field(default_factory=list)
    closed: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))


@asynccontextmanager
async def listening(handle: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    """Serve each connection with ``handle`` on 127.0.0.1, then close it."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.ports.append(writer.get_extra_info("peername")[1])
        try:
            await handle(Exchange(reader, writer))
        except asyncio.CancelledError:
            pass  # cut when the server stops: ends the task as if it had returned
        finally:
            writer.close()
            await writer.wait_closed()
            server.closed.release()

    listener = await asyncio.start_server(on_connection, "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    server = Server(f"{'https' if tls else 'http'}://127.0.0.1:{port}/")
    async with listener:
        yield server


LARGE_BODY = bytes(range(256)) * 8192
"""2 MiB: more than a socket takes at once."""
LONG_ANSWER = b"x" * 1_000_000
"""An answer a client reads in several pieces."""
STREAMED_LINES = [b"data: 1", b"data: 2"]
"""The lines of ``stream_then_answer``'s first answer."""


async def answer_each(exchange: Exchange) -> None:
    """Answer every request of the connection with ``ok``."""
    while await exchange.request() is not None:
        await exchange.answer(b"ok")


async def answer_whether_large_body_came_whole(exchange: Exchange) -> None:
    """Answer the request with its body's length and whether it is ``LARGE_BODY``."""
    received = await exchange.request() or b""
    await exchange.answer(b"%d %s" % (len(received), b"same" if received == LARGE_BODY else b""))


async def stream_then_answer(exchange: Exchange) -> None:
    """Answer a first request in chunks, each of ``STREAMED_LINES``; then as ``answer_each``."""
    await exchange.request()
    exchange.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for line in STREAMED_LINES:
        piece = line + b"\n\n"
        exchange.writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await exchange.writer.drain()
    exchange.writer.write(b"0\r\n\r\n")
    await answer_each(exchange)


async def answer_long(exchange: Exchange) -> None:
    """Answer every request of the connection with ``LONG_ANSWER``."""
    while await exchange.request() is not None:
        await exchange.answer(LONG_ANSWER)


def answering_once(*headers: str) -> Handler:
    """A handler answering ``ok`` (with ``headers``) to one request, then closing."""

    async def handle(exchange: Exchange) -> None:
        await exchange.request()
        await exchange.answer(b"ok", *headers)

    return handle


async def close_at_once(exchange: Exchange) -> None:
    """Read the request, then close instead of answering."""
    await exchange.request()


async def never_answer(exchange: Exchange) -> None:
    """Read the request, then wait until the server stops."""
    await exchange.request()
    await asyncio.Event().wait()


def answering_in_rounds(size: int, on_full: Callable[[], None]) -> Handler:
    """A handler answering ``ok`` to requests in rounds of ``size``.

    No request of a round is answered until all of it arrived, so that the whole round
    is in flight at once, whatever the timing; ``on_full`` is called at that moment.
    """
    arrived = 0
    rounds: list[asyncio.Event] = []

    async def handle(exchange: Exchange) -> None:
        nonlocal arrived
        while await exchange.request() is not None:
            index, arrived = arrived // size, arrived + 1
            while len(rounds) <= index:
                rounds.append(asyncio.Event())
            if arrived % size == 0:
                on_full()
                rounds[index].set()
            await rounds[index].wait()
            await exchange.answer(b"ok")

    return handle


class ServerThread:
    """A ``listening`` server on the event loop of a thread of its own."""

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        self._server, self._loop = server, loop

    @property
    def url(self) -> str:
        """Where it listens."""
        return self._server.url

    @property
    def ports(self) -> list[int]:
        """The client port of each connection it took, in order."""
        return list(self._server.ports)

    def connection_closed(self) -> None:
        """Wait until the server has closed one more connection."""
        asyncio.run_coroutine_threadsafe(self._server.closed.acquire(), self._loop).result()


@contextmanager
def listening_in_thread(
    handle: Handler, tls: ssl.SSLContext | None = None
) -> Iterator[ServerThread]:
    """``listening``, on a thread of its own; connections still served at the end are cut."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server", daemon=True)
    thread.start()
    try:
        serving = listening(handle, tls)
        server = asyncio.run_coroutine_threadsafe(serving.__aenter__(), loop).result()
        try:
            yield ServerThread(server, loop)
        finally:
            asyncio.run_coroutine_threadsafe(_stop(serving), loop).result()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


async def _stop(serving: AbstractAsyncContextManager[Server]) -> None:
    handlers = asyncio.all_tasks() - {asyncio.current_task()}
    for handler in handlers:
        handler.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    await serving.__aexit__(None, None, None)


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key, in ``folder``.

    Made by the ``openssl`` command, which the HTTPS tests need: without it they fail
    rather than skip.
    """
    cert, key = folder / "cert.pem", folder / "key.pem"
    names = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert)]
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subprocess.run([*command, *files, *names], check=True, capture_output=True)
    return cert, key


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    """The server's side of TLS with ``cert`` and its ``key``."""
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    return tls
