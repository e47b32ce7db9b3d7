"""``AsyncioTransport`` over real sockets on 127.0.0.1, against small servers in the test's loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from http_servers import (
    LARGE_BODY,
    LONG_ANSWER,
    STREAMED_LINES,
    Exchange,
    answer_each,
    answer_long,
    answer_whether_large_body_came_whole,
    answering_in_rounds,
    answering_once,
    close_at_once,
    listening,
    never_answer,
    self_signed_certificate,
    server_tls,
    stream_then_answer,
)
from support import free_port, serving

from lightning_moondream.api.async_transport import AsyncioTransport

T = TypeVar("T")


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
    answer = answering_in_rounds(together, lambda: in_flight.append(transport.in_flight))

    async def scenario() -> list[int]:
        async with listening(answer) as server, httpx.AsyncClient(transport=transport) as client:
            for _ in range(2):
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
    async def scenario() -> str:
        async with (
            listening(answer_whether_large_body_came_whole) as server,
            httpx.AsyncClient(transport=AsyncioTransport()) as client,
        ):
            return (await client.post(server.url, content=LARGE_BODY)).text

    assert run(scenario) == f"{len(LARGE_BODY)} same"


def test_a_streamed_answer_arrives_in_pieces_and_frees_its_connection_at_its_end() -> None:
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
    assert lines == [line.decode() for line in STREAMED_LINES]
    assert len(ports) == 1


def test_an_answer_closed_before_its_end_takes_its_connection_with_it() -> None:
    transport = AsyncioTransport()

    async def scenario() -> list[int]:
        async with listening(answer_long) as server, httpx.AsyncClient(transport=transport) as c:
            async with c.stream("GET", server.url) as response:
                await response.aiter_raw().__anext__()  # a first piece only
            assert transport.idle == 0
            assert (await c.get(server.url)).content == LONG_ANSWER
            return server.ports

    assert len(run(scenario)) == 2
    assert transport.in_flight == 0


@pytest.mark.parametrize("says_so", [True, False], ids=["connection-close", "silently"])
def test_a_connection_the_server_closed_is_not_reused(says_so: bool) -> None:
    answer_once = answering_once("Connection: close") if says_so else answering_once()

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


def test_https_checks_the_servers_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed_certificate(tmp_path)
    tls = server_tls(cert, key)

    async def scenario() -> str:
        async with listening(answer_each, tls) as server:
            async with httpx.AsyncClient(transport=AsyncioTransport()) as untrusting:
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await untrusting.get(server.url)
            monkeypatch.setenv("SSL_CERT_FILE", str(cert))
            async with httpx.AsyncClient(transport=AsyncioTransport()) as trusting:
                return (await trusting.get(server.url)).text

    assert run(scenario) == "ok"
