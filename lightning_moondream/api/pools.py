"""HTTP transports that spread concurrent requests over several small connection pools.

httpcore 1.0's connection pool walks every one of its connections, polling each idle
socket, whenever a request starts or ends, and offers a freed connection to every
waiting request at once. With 32 requests in flight on one pool, that bookkeeping
delayed the last answer of a batch by about 150 ms on two cores (see
``benchmarks/bench_training_loop.py``). Several small pools keep each walk short. Each
request goes to the pool with the fewest requests in flight, so connections are reused
as they would be in one pool.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Generic, TypeVar

import httpx

POOLS = 8
"""Pools per transport."""
CONNECTIONS_PER_POOL = 12
"""Connections per pool, so that a transport holds at most about httpx's default 100."""
KEEPALIVE_PER_POOL = 4
"""Idle connections each pool keeps open."""

PoolT = TypeVar("PoolT", httpx.HTTPTransport, httpx.AsyncHTTPTransport)


def _pool_options() -> tuple[ssl.SSLContext, httpx.Limits]:
    # One TLS context for all pools: making one takes milliseconds.
    limits = httpx.Limits(
        max_connections=CONNECTIONS_PER_POOL, max_keepalive_connections=KEEPALIVE_PER_POOL
    )
    return httpx.create_ssl_context(), limits


class _Balancer(Generic[PoolT]):
    """Pools and their requests in flight (counted until the answer's body is closed)."""

    def __init__(self, pools: list[PoolT]) -> None:
        self.pools: list[PoolT] = pools
        self._in_flight = [0] * len(pools)
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> list[int]:
        """Requests in flight per pool."""
        with self._lock:
            return list(self._in_flight)

    def acquire(self) -> tuple[PoolT, Callable[[], None]]:
        """The least busy pool, and a callable that releases it (once)."""
        with self._lock:
            index = min(range(len(self.pools)), key=self._in_flight.__getitem__)
            self._in_flight[index] += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._in_flight[index] -= 1

        return self.pools[index], release


class _ReleasingStream(httpx.SyncByteStream):
    def __init__(self, stream: httpx.SyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release = release

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._release()


class _AsyncReleasingStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._release()


def _with_stream(
    response: httpx.Response, stream: httpx.SyncByteStream | httpx.AsyncByteStream
) -> httpx.Response:
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=stream,
        extensions=response.extensions,
    )


class SpreadTransport(httpx.BaseTransport):
    """Sync HTTP transport over ``pools`` small connection pools.

    Args:
        pools: How many pools.
    """

    def __init__(self, pools: int = POOLS) -> None:
        context, limits = _pool_options()
        self._balancer = _Balancer(
            [httpx.HTTPTransport(verify=context, limits=limits) for _ in range(pools)]
        )

    @property
    def in_flight(self) -> list[int]:
        """Requests in flight per pool, each counted until its answer is closed."""
        return self._balancer.in_flight

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send the request on the least busy pool."""
        pool, release = self._balancer.acquire()
        try:
            response = pool.handle_request(request)
        except BaseException:
            release()
            raise
        assert isinstance(response.stream, httpx.SyncByteStream)
        return _with_stream(response, _ReleasingStream(response.stream, release))

    def close(self) -> None:
        """Close every pool, even if closing one fails."""
        with contextlib.ExitStack() as stack:
            for pool in self._balancer.pools:
                stack.callback(pool.close)


class AsyncSpreadTransport(httpx.AsyncBaseTransport):
    """Async HTTP transport over ``pools`` small connection pools.

    Args:
        pools: How many pools.
    """

    def __init__(self, pools: int = POOLS) -> None:
        context, limits = _pool_options()
        self._balancer = _Balancer(
            [httpx.AsyncHTTPTransport(verify=context, limits=limits) for _ in range(pools)]
        )

    @property
    def in_flight(self) -> list[int]:
        """Requests in flight per pool, each counted until its answer is closed."""
        return self._balancer.in_flight

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send the request on the least busy pool."""
        pool, release = self._balancer.acquire()
        try:
            response = await pool.handle_async_request(request)
        except BaseException:
            release()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return _with_stream(response, _AsyncReleasingStream(response.stream, release))

    async def aclose(self) -> None:
        """Close every pool, even if closing one fails."""
        async with contextlib.AsyncExitStack() as stack:
            for pool in self._balancer.pools:
                stack.push_async_callback(pool.aclose)


def _environment_proxies() -> bool:
    return any(scheme != "no" for scheme in urllib.request.getproxies())


def spread_client() -> httpx.Client:
    """An ``httpx.Client`` over ``SpreadTransport``.

    With proxies set in the environment (``HTTPS_PROXY``, ...), httpx's own client
    instead: httpx honours them only when no transport is given.
    """
    return httpx.Client() if _environment_proxies() else httpx.Client(transport=SpreadTransport())


def async_spread_client() -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` over ``AsyncSpreadTransport``, as ``spread_client``."""
    if _environment_proxies():
        return httpx.AsyncClient()
    return httpx.AsyncClient(transport=AsyncSpreadTransport())
