"""Spread transports over real HTTP on 127.0.0.1: requests spread over pools, connections reused."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpcore
import httpx
import pytest
from support import free_port, serving

from lightning_moondream.api import AsyncTuningClient, TuningClient
from lightning_moondream.api.async_transport import AsyncioTransport
from lightning_moondream.api.pools import POOLS, SpreadTransport

CONCURRENT = 2 * POOLS


class Gathering:
    """ASGI app answering no request until ``count`` are in, each with its client port.

    While they wait, every request the client sent is in flight at once, whatever the
    timing, so the spread can be read off the transport at that moment.
    """

    def __init__(self, count: int, on_full: Callable[[], None]) -> None:
        self.count = count
        self.on_full = on_full
        self.ports: list[int] = []
        self._complete_rounds = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        self.ports.append(scope["client"][1])
        this_round = (len(self.ports) - 1) // self.count
        if len(self.ports) % self.count == 0:
            self.on_full()
            self._complete_rounds += 1
        while self._complete_rounds <= this_round:
            await asyncio.sleep(0.005)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def test_sync_requests_spread_evenly_and_reuse_their_connections() -> None:
    transport = SpreadTransport()
    spread: list[list[int]] = []
    app = Gathering(CONCURRENT, lambda: spread.append(transport.in_flight))
    with (
        serving(app) as url,
        httpx.Client(transport=transport) as client,
        ThreadPoolExecutor(CONCURRENT) as threads,
    ):
        for _ in range(2):
            answers = list(threads.map(lambda _: client.get(url), range(CONCURRENT)))
            assert all(answer.status_code == 200 for answer in answers)
    assert spread == [[2] * POOLS, [2] * POOLS]
    assert transport.in_flight == [0] * POOLS
    assert set(app.ports[CONCURRENT:]) == set(app.ports[:CONCURRENT])


def test_a_failed_request_frees_its_pool() -> None:
    url = f"http://127.0.0.1:{free_port()}/"
    sync_transport = SpreadTransport()
    with httpx.Client(transport=sync_transport) as client, pytest.raises(httpx.ConnectError):
        client.get(url)
    assert sync_transport.in_flight == [0] * POOLS


def test_clients_use_their_own_transports_by_default() -> None:
    with TuningClient(api_key="k" * 12, base_url="http://127.0.0.1:1/v1/tuning") as client:
        assert isinstance(client._http._transport, SpreadTransport)

    async def open_async() -> None:
        async with AsyncTuningClient(api_key="k" * 12, base_url="http://127.0.0.1:1/v1") as client:
            assert isinstance(client._http._transport, AsyncioTransport)

    asyncio.run(open_async())


def test_proxies_in_the_environment_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    with TuningClient(api_key="k" * 12, base_url="https://api.example/v1/tuning") as client:
        assert not isinstance(client._http._transport, SpreadTransport)
        proxied = client._http._transport_for_url(httpx.URL("https://api.example/v1/tuning"))
        assert isinstance(proxied._pool, httpcore.AsyncHTTPProxy | httpcore.HTTPProxy)

    async def open_async() -> None:
        async with AsyncTuningClient(api_key="k" * 12, base_url="https://api.example/v1") as client:
            assert not isinstance(client._http._transport, AsyncioTransport)

    asyncio.run(open_async())
