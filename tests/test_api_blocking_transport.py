"""``BlockingTransport`` over real sockets on 127.0.0.1, against small servers on a thread."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
    listening_in_thread,
    never_answer,
    self_signed_certificate,
    server_tls,
    stream_then_answer,
)
from support import free_port, read_request, serving

from lightning_moondream.api.blocking_transport import BlockingTransport


def wait_until(condition: Callable[[], bool]) -> None:
    """Wait for another thread to bring ``condition`` about (failing after a minute)."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, "the condition never came about"
        time.sleep(0.001)


def test_sequential_requests_reuse_one_connection() -> None:
    transport = BlockingTransport()
    with listening_in_thread(answer_each) as server, httpx.Client(transport=transport) as client:
        assert [client.get(server.url).text for _ in range(3)] == ["ok"] * 3
        ports = server.ports
    assert len(ports) == 1
    assert (transport.in_flight, transport.idle) == (0, 0)  # closed with the client


def test_requests_in_flight_together_each_get_a_connection_then_reuse_them() -> None:
    transport = BlockingTransport()
    together = 12
    in_flight: list[int] = []
    answer = answering_in_rounds(together, lambda: in_flight.append(transport.in_flight))
    with (
        listening_in_thread(answer) as server,
        httpx.Client(transport=transport) as client,
        ThreadPoolExecutor(together) as threads,
    ):
        for _ in range(2):
            answers = list(threads.map(lambda _: client.get(server.url), range(together)))
            assert [answer.text for answer in answers] == ["ok"] * together
        ports = server.ports
    assert in_flight == [together, together]
    assert len(ports) == together  # the second round went over the first's connections


def test_requests_beyond_the_connection_limit_wait_their_turn() -> None:
    transport = BlockingTransport(max_connections=2)
    in_flight: list[int] = []
    answer = answering_in_rounds(2, lambda: in_flight.append(transport.in_flight))
    with (
        listening_in_thread(answer) as server,
        httpx.Client(transport=transport) as client,
        ThreadPoolExecutor(8) as threads,
    ):
        answers = list(threads.map(lambda _: client.get(server.url), range(8)))
        assert [answer.text for answer in answers] == ["ok"] * 8
        ports = server.ports
    assert in_flight == [2, 2, 2, 2]
    assert len(ports) == 2
    assert (transport.in_flight, transport.waiting) == (0, 0)


def test_a_large_body_is_sent_whole() -> None:
    with (
        listening_in_thread(answer_whether_large_body_came_whole) as server,
        httpx.Client(transport=BlockingTransport()) as client,
    ):
        assert client.post(server.url, content=LARGE_BODY).text == f"{len(LARGE_BODY)} same"


def test_a_body_of_unknown_length_is_sent_in_chunks() -> None:
    async def echo(scope: Any, receive: Any, send: Any) -> None:
        body, _ = await read_request(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    def pieces() -> Iterator[bytes]:
        yield from (b"one ", b"", b"two ", b"three")

    with serving(echo) as url, httpx.Client(transport=BlockingTransport()) as client:
        answer = client.post(url, content=pieces())
        assert answer.request.headers["Transfer-Encoding"] == "chunked"
        assert answer.text == "one two three"
        assert client.get(url).text == ""  # the connection is still in step


def test_a_streamed_answer_arrives_in_pieces_and_frees_its_connection_at_its_end() -> None:
    with (
        listening_in_thread(stream_then_answer) as server,
        httpx.Client(transport=BlockingTransport()) as client,
    ):
        with client.stream("GET", server.url) as response:
            lines = [line for line in response.iter_lines() if line]
        assert client.get(server.url).text == "ok"
        ports = server.ports
    assert lines == [line.decode() for line in STREAMED_LINES]
    assert len(ports) == 1


def test_an_answer_closed_before_its_end_takes_its_connection_with_it() -> None:
    transport = BlockingTransport()
    with listening_in_thread(answer_long) as server, httpx.Client(transport=transport) as c:
        with c.stream("GET", server.url) as response:
            next(response.iter_raw())  # a first piece only
        assert transport.idle == 0
        assert c.get(server.url).content == LONG_ANSWER
        ports = server.ports
    assert len(ports) == 2
    assert transport.in_flight == 0


def test_an_answer_without_a_length_ends_with_its_connection() -> None:
    async def answer_until_close(exchange: Exchange) -> None:
        await exchange.request()
        exchange.writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")

    transport = BlockingTransport()
    with listening_in_thread(answer_until_close) as server, httpx.Client(transport=transport) as c:
        answer = c.get(server.url)
        assert (answer.http_version, answer.text) == ("HTTP/1.0", "until the end")
        assert c.get(server.url).text == "until the end"
        ports = server.ports
    assert len(set(ports)) == 2
    assert transport.idle == 0


@pytest.mark.parametrize("says_so", [True, False], ids=["connection-close", "silently"])
def test_a_connection_the_server_closed_is_not_reused(says_so: bool) -> None:
    answer_once = answering_once("Connection: close") if says_so else answering_once()
    with (
        listening_in_thread(answer_once) as server,
        httpx.Client(transport=BlockingTransport()) as client,
    ):
        for _ in range(3):
            assert client.get(server.url).text == "ok"
            server.connection_closed()  # closed before the next request is sent
        ports = server.ports
    assert len(set(ports)) == 3


@pytest.mark.parametrize(
    "options", [{"keepalive_expiry": 0.0}, {"max_keepalive": 0}], ids=["expired", "none-kept"]
)
def test_idle_connections_are_kept_only_as_long_and_as_many_as_allowed(
    options: dict[str, Any],
) -> None:
    transport = BlockingTransport(**options)
    with listening_in_thread(answer_each) as server, httpx.Client(transport=transport) as client:
        assert [client.get(server.url).text for _ in range(2)] == ["ok"] * 2
        ports = server.ports
    assert len(set(ports)) == 2


def test_a_server_closing_instead_of_answering_is_a_protocol_error() -> None:
    with (
        listening_in_thread(close_at_once) as server,
        httpx.Client(transport=BlockingTransport()) as client,
        pytest.raises(httpx.RemoteProtocolError, match="without sending a response"),
    ):
        client.get(server.url)


def test_a_server_closing_mid_answer_is_a_protocol_error() -> None:
    async def cut_short(exchange: Exchange) -> None:
        await exchange.request()
        exchange.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")

    transport = BlockingTransport()
    with (
        listening_in_thread(cut_short) as server,
        httpx.Client(transport=transport) as client,
        pytest.raises(httpx.RemoteProtocolError, match="mid-answer"),
    ):
        client.get(server.url)
    assert (transport.in_flight, transport.idle) == (0, 0)


def test_a_silent_server_times_out_and_its_connection_is_dropped() -> None:
    transport = BlockingTransport()
    with listening_in_thread(never_answer) as server, httpx.Client(transport=transport) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.get(server.url, timeout=httpx.Timeout(5.0, read=0.05))
        assert (transport.in_flight, transport.idle) == (0, 0)


def test_a_wait_for_a_connection_times_out_and_a_turn_freed_is_taken() -> None:
    transport = BlockingTransport(max_connections=1)
    with (
        listening_in_thread(answer_each) as server,
        httpx.Client(transport=transport) as client,
        ThreadPoolExecutor(1) as thread,
    ):
        with client.stream("GET", server.url) as holding:  # the only connection
            with pytest.raises(httpx.PoolTimeout):
                client.get(server.url, timeout=httpx.Timeout(5.0, pool=0.05))
            waiting = thread.submit(client.get, server.url)
            wait_until(lambda: transport.waiting == 1)
            assert holding.read() == b"ok"
        assert waiting.result().text == "ok"
        ports = server.ports
    assert len(ports) == 1
    assert (transport.in_flight, transport.waiting) == (0, 0)


def test_a_refused_connection_is_a_connect_error_and_frees_its_turn() -> None:
    transport = BlockingTransport(max_connections=1)
    with listening_in_thread(answer_each) as server, httpx.Client(transport=transport) as c:
        with pytest.raises(httpx.ConnectError):
            c.get(f"http://127.0.0.1:{free_port()}/")
        assert c.get(server.url).text == "ok"


def test_only_http_and_https_are_spoken() -> None:
    with pytest.raises(httpx.UnsupportedProtocol, match=r"ftp://example\.com/"):
        BlockingTransport().handle_request(httpx.Request("GET", "ftp://example.com/"))


def test_a_header_holding_a_line_break_is_never_sent() -> None:
    arrived: list[bytes] = []

    async def note(exchange: Exchange) -> None:
        while (body := await exchange.request()) is not None:
            arrived.append(body)
            await exchange.answer(b"ok")

    transport = BlockingTransport(max_connections=1)
    with listening_in_thread(note) as server, httpx.Client(transport=transport) as client:
        with pytest.raises(httpx.LocalProtocolError, match="line break"):
            client.get(server.url, headers={"X-Note": "a\r\nX-Smuggled: b"})
        assert client.get(server.url).text == "ok"
    assert arrived == [b""]


def test_requests_from_many_threads_share_the_transport_safely() -> None:
    transport = BlockingTransport(max_connections=4)
    with (
        listening_in_thread(answer_each) as server,
        httpx.Client(transport=transport) as client,
        ThreadPoolExecutor(16) as threads,
    ):
        answers = list(threads.map(lambda _: client.get(server.url).text, range(400)))
        ports = server.ports
    assert answers == ["ok"] * 400
    assert len(ports) <= 4
    assert (transport.in_flight, transport.waiting, transport.idle) == (0, 0, 0)


def test_https_checks_the_servers_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed_certificate(tmp_path)
    with listening_in_thread(answer_each, server_tls(cert, key)) as server:
        with (
            httpx.Client(transport=BlockingTransport()) as untrusting,
            pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
        ):
            untrusting.get(server.url)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        with httpx.Client(transport=BlockingTransport()) as trusting:
            assert [trusting.get(server.url).text for _ in range(2)] == ["ok"] * 2
            ports = server.ports
    assert len(ports) == 1  # kept for both (the refused one never got past TLS)


def test_closing_the_transport_closes_its_idle_connections() -> None:
    transport = BlockingTransport()
    with listening_in_thread(answer_each) as server:
        with httpx.Client(transport=transport) as client:
            assert client.get(server.url).text == "ok"
            assert transport.idle == 1
        server.connection_closed()  # the server saw the client close it
        assert transport.idle == 0


class Interrupted(Exception):
    """Raised by a signal handler in the main thread, as Ctrl-C raises KeyboardInterrupt."""


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="signals a thread (POSIX)")
def test_a_request_interrupted_while_waiting_leaves_the_queue() -> None:
    assert threading.current_thread() is threading.main_thread()
    transport = BlockingTransport(max_connections=1)

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    def interrupt_the_wait() -> None:
        wait_until(lambda: transport.waiting == 1)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with (
            listening_in_thread(answer_each) as server,
            httpx.Client(transport=transport) as client,
            ThreadPoolExecutor(1) as thread,
        ):
            with client.stream("GET", server.url) as holding:  # the only connection
                thread.submit(interrupt_the_wait)
                with pytest.raises(Interrupted):
                    client.get(server.url)
                assert transport.waiting == 0
                assert holding.read() == b"ok"
            assert client.get(server.url).text == "ok"
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert transport.in_flight == 0
