"""``AsyncioTransport`` over real sockets on 127.0.0.1, against small servers in the test's loop.

Each server is a few lines of asyncio that read requests and answer them as the test
needs, including the ways real servers misbehave: closing idle connections, closing
instead of answering, never answering.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from support import free_port, serving

from lightning_moondream.api.async_transport import AsyncioTransport

T = TypeVar("T")


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
        finally:
            writer.close()
            await writer.wait_closed()
            server.closed.release()

    listener = await asyncio.start_server(on_connection, "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    server = Server(f"{'https' if tls else 'http'}://127.0.0.1:{port}/")
    async with listener:
        yield server


async def answer_each(exchange: Exchange) -> None:
    """Answer every request of the connection with ``ok``."""
    while await exchange.request() is not None:
        await exchange.answer(b"ok")


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


def test_sequential_requests_reuse_one_connection() -> None:
    transport = AsyncioTransport()

    async def scenario() -> list[int]:
        async with listening(answer_each) as server, httpx.AsyncClient(transport=transport) as c:
            assert [(await c.get(server.url)).text for _ in range(3)] == ["ok"] * 3
            return server.ports

    assert len(run(scenario)) == 1
    assert (transport.in_flight, transport.idle) == (0, 0)  # closed with the client


def test_requests_in_flight_together_each_get_a_connection_then_reuse_them() -> None:
    transport = AsyncioTransport()
    together = 12
    in_flight: list[int] = []

    async def scenario() -> list[int]:
        arrived = 0
        all_in = asyncio.Event()

        async def answer_when_all_are_in(exchange: Exchange) -> None:
            nonlocal arrived
            while await exchange.request() is not None:
                arrived += 1
                if arrived % together == 0:
                    in_flight.append(transport.in_flight)
                    all_in.set()
                await all_in.wait()
                await exchange.answer(b"ok")

        async with (
            listening(answer_when_all_are_in) as server,
            httpx.AsyncClient(transport=transport) as client,
        ):
            for _ in range(2):
                all_in.clear()
                answers = await asyncio.gather(*(client.get(server.url) for _ in range(together)))
                assert [answer.text for answer in answers] == ["ok"] * together
            return server.ports

    ports = run(scenario)
    assert in_flight == [together, together]
    assert len(ports) == together  # the second round went over the first's connections


def test_requests_beyond_the_connection_limit_wait_their_turn() -> None:
    transport = AsyncioTransport(max_connections=2)

    async def scenario() -> list[int]:
        async with listening(answer_each) as server, httpx.AsyncClient(transport=transport) as c:
            answers = await asyncio.gather(*(c.get(server.url) for _ in range(7)))
            assert [answer.text for answer in answers] == ["ok"] * 7
            return server.ports

    assert len(run(scenario)) == 2
    assert transport.in_flight == 0


def test_a_large_body_is_sent_whole() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB: more than the socket takes at once

    async def count(exchange: Exchange) -> None:
        received = await exchange.request() or b""
        await exchange.answer(b"%d %s" % (len(received), b"same" if received == body else b""))

    async def scenario() -> str:
        async with listening(count) as server, httpx.AsyncClient(transport=AsyncioTransport()) as c:
            return (await c.post(server.url, content=body)).text

    assert run(scenario) == f"{len(body)} same"


def test_a_streamed_answer_arrives_in_pieces_and_frees_its_connection_at_its_end() -> None:
    async def stream_then_answer(exchange: Exchange) -> None:
        await exchange.request()
        exchange.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"data: 1\n\n", b"data: 2\n\n"):
            exchange.writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await exchange.writer.drain()
        exchange.writer.write(b"0\r\n\r\n")
        await answer_each(exchange)

    async def scenario() -> tuple[list[str], list[int]]:
        async with (
            listening(stream_then_answer) as server,
            httpx.AsyncClient(transport=AsyncioTransport()) as client,
        ):
            async with client.stream("GET", server.url) as response:
                lines = [line async for line in response.aiter_lines() if line]
            assert (await client.get(server.url)).text == "ok"
            return lines, server.ports

    lines, ports = run(scenario)
    assert lines == ["data: 1", "data: 2"]
    assert len(ports) == 1


def test_an_answer_closed_before_its_end_takes_its_connection_with_it() -> None:
    transport = AsyncioTransport()

    async def long_answers(exchange: Exchange) -> None:
        while await exchange.request() is not None:
            await exchange.answer(b"x" * 1_000_000)

    async def scenario() -> list[int]:
        async with listening(long_answers) as server, httpx.AsyncClient(transport=transport) as c:
            async with c.stream("GET", server.url) as response:
                await response.aiter_raw().__anext__()  # a first piece only
            assert transport.idle == 0
            assert len((await c.get(server.url)).content) == 1_000_000
            return server.ports

    assert len(run(scenario)) == 2
    assert transport.in_flight == 0


@pytest.mark.parametrize("says_so", [True, False], ids=["connection-close", "silently"])
def test_a_connection_the_server_closed_is_not_reused(says_so: bool) -> None:
    headers = ["Connection: close"] if says_so else []

    async def answer_once(exchange: Exchange) -> None:
        await exchange.request()
        await exchange.answer(b"ok", *headers)

    async def scenario() -> list[int]:
        async with (
            listening(answer_once) as server,
            httpx.AsyncClient(transport=AsyncioTransport()) as client,
        ):
            for _ in range(3):
                assert (await client.get(server.url)).text == "ok"
                await server.closed.acquire()  # closed before the next request is sent
            return server.ports

    assert len(set(run(scenario))) == 3


def test_a_server_closing_instead_of_answering_is_a_protocol_error() -> None:
    async def close_at_once(exchange: Exchange) -> None:
        await exchange.request()

    async def scenario() -> None:
        async with (
            listening(close_at_once) as server,
            httpx.AsyncClient(transport=AsyncioTransport()) as client,
        ):
            await client.get(server.url)

    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        run(scenario)


def test_a_silent_server_times_out_and_its_connection_is_dropped() -> None:
    transport = AsyncioTransport()

    async def never_answer(exchange: Exchange) -> None:
        await exchange.request()
        await asyncio.Event().wait()

    async def scenario() -> None:
        async with listening(never_answer) as server, httpx.AsyncClient(transport=transport) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.get(server.url, timeout=httpx.Timeout(5.0, read=0.05))
            assert (transport.in_flight, transport.idle) == (0, 0)

    run(scenario)


def test_a_wait_for_a_connection_times_out_and_a_turn_freed_is_taken() -> None:
    transport = AsyncioTransport(max_connections=1)

    async def scenario() -> list[int]:
        async with listening(answer_each) as server, httpx.AsyncClient(transport=transport) as c:
            async with c.stream("GET", server.url) as holding:  # the only connection
                with pytest.raises(httpx.PoolTimeout):
                    await c.get(server.url, timeout=httpx.Timeout(5.0, pool=0.05))
                waiting = asyncio.ensure_future(c.get(server.url))
                await asyncio.sleep(0)
                assert await holding.aread() == b"ok"
            assert (await waiting).text == "ok"
            return server.ports

    assert len(run(scenario)) == 1
    assert transport.in_flight == 0


def test_a_cancelled_request_frees_its_turn() -> None:
    transport = AsyncioTransport(max_connections=1)

    async def scenario() -> None:
        arrived = asyncio.Event()

        async def answer_all_but_the_first(exchange: Exchange) -> None:
            if not arrived.is_set():
                await exchange.request()
                arrived.set()
                await asyncio.Event().wait()
            await answer_each(exchange)

        async with (
            listening(answer_all_but_the_first) as server,
            httpx.AsyncClient(transport=transport) as client,
        ):
            stuck = asyncio.ensure_future(client.get(server.url))
            await arrived.wait()
            stuck.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stuck
            assert (await client.get(server.url)).text == "ok"

    run(scenario)


def test_a_refused_connection_is_a_connect_error_and_frees_its_turn() -> None:
    transport = AsyncioTransport(max_connections=1)

    async def scenario() -> None:
        async with listening(answer_each) as server, httpx.AsyncClient(transport=transport) as c:
            with pytest.raises(httpx.ConnectError):
                await c.get(f"http://127.0.0.1:{free_port()}/")
            assert (await c.get(server.url)).text == "ok"

    run(scenario)


def test_only_http_and_https_are_spoken() -> None:
    async def scenario() -> None:
        await AsyncioTransport().handle_async_request(httpx.Request("GET", "ftp://example.com/"))

    with pytest.raises(httpx.UnsupportedProtocol, match=r"ftp://example\.com/"):
        run(scenario)


def test_a_client_used_on_two_event_loops_opens_connections_on_each() -> None:
    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    client = httpx.AsyncClient(transport=AsyncioTransport())
    with serving(ok) as url:
        assert asyncio.run(client.get(url)).text == "ok"
        assert asyncio.run(client.get(url)).text == "ok"
        asyncio.run(client.aclose())


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key (made by the openssl command,
    which this test needs: without it the test fails rather than skips)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    names = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert)]
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subprocess.run([*command, *files, *names], check=True, capture_output=True)
    return cert, key


def test_https_checks_the_servers_certificate(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    async def scenario() -> str:
        async with listening(answer_each, tls) as server:
            async with httpx.AsyncClient(transport=AsyncioTransport()) as untrusting:
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await untrusting.get(server.url)
            monkeypatch.setenv("SSL_CERT_FILE", str(cert))
            async with httpx.AsyncClient(transport=AsyncioTransport()) as trusting:
                return (await trusting.get(server.url)).text

    assert run(scenario) == "ok"
