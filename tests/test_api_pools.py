"""The clients' own HTTP clients: this package's transports, unless proxies are set."""

from __future__ import annotations

import asyncio

import httpcore
import httpx
import pytest

from lightning_moondream.api import AsyncTuningClient, TuningClient
from lightning_moondream.api.async_transport import AsyncioTransport
from lightning_moondream.api.blocking_transport import BlockingTransport


def test_clients_use_their_own_transports_by_default() -> None:
    with TuningClient(api_key="k" * 12, base_url="http://127.0.0.1:1/v1/tuning") as client:
        assert isinstance(client._http._transport, BlockingTransport)

    async def open_async() -> None:
        async with AsyncTuningClient(api_key="k" * 12, base_url="http://127.0.0.1:1/v1") as client:
            assert isinstance(client._http._transport, AsyncioTransport)

    asyncio.run(open_async())


def test_proxies_in_the_environment_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    with TuningClient(api_key="k" * 12, base_url="https://api.example/v1/tuning") as client:
        assert not isinstance(client._http._transport, BlockingTransport)
        proxied = client._http._transport_for_url(httpx.URL("https://api.example/v1/tuning"))
        assert isinstance(proxied._pool, httpcore.AsyncHTTPProxy | httpcore.HTTPProxy)

    async def open_async() -> None:
        async with AsyncTuningClient(api_key="k" * 12, base_url="https://api.example/v1") as client:
            assert not isinstance(client._http._transport, AsyncioTransport)

    asyncio.run(open_async())


def test_a_given_http_client_is_used_as_given_and_left_open() -> None:
    given = httpx.Client(transport=httpx.HTTPTransport())
    with TuningClient(api_key="k" * 12, http_client=given) as client:
        assert client._http is given
    assert not given.is_closed
    given.close()
