"""The clients' own HTTP clients: connection pools fit for many requests in flight.

httpcore 1.0's connection pool walks every one of its connections, polling each idle
socket, whenever a request starts or ends, and offers a freed connection to every
waiting request at once. With 32 requests in flight on one pool, that bookkeeping
delayed the last answer of a batch by about 150 ms on two cores (see
``benchmarks/bench_training_loop.py``). The blocking client spreads its requests over
several small pools, which keeps each walk short: each request goes to the pool with the
fewest requests in flight, so connections are reused as they would be in one pool. The
async client sends through ``AsyncioTransport``, whose pool is a list per origin.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import urllib.request
from collections.abc import Callable, Iterator

import httpx

from lightning_moondream.api.async_transport import AsyncioTransport

POOLS = 8
"""Pools per transport."""
CONNECTIONS_PER_POOL = 12
"""Connections per pool, so that a transport holds at most about httpx's default 100."""
KEEPALIVE_PER_POOL = 4
"""Idle connections each pool keeps open."""


def _pool_options() -> tuple[ssl.SSLContext, httpx.Limits]:
    # One TLS context for all pools: making one takes milliseconds.
    limits = httpx.Limits(
        max_connections=CONNECTIONS_PER_POOL, max_keepalive_connections=KEEPALIVE_PER_POOL
    )
    return httpx.create_ssl_context(), limits


class _Balancer:
    """Pools and their requests in flight (counted until the answer's body is closed)."""

    def __init__(self, pools: list[httpx.HTTPTransport]) -> None:
        self.pools = pools
        self._in_flight = [0] * len(pools)
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> list[int]:
        """Requests in flight per pool."""
        with self._lock:
            return list(self._in_flight)

    def acquire(self) -> tuple[httpx.HTTPTransport, Callable[[], None]]:
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
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_ReleasingStream(response.stream, release),
            extensions=response.extensions,
        )

    def close(self) -> None:
        """Close every pool, even if closing one fails."""
        with contextlib.ExitStack() as stack:
            for pool in self._balancer.pools:
                stack.callback(pool.close)


def _environment_proxies() -> bool:
    return any(scheme != "no" for scheme in urllib.request.getproxies())


def spread_client() -> httpx.Client:
    """An ``httpx.Client`` over ``SpreadTransport``.

    With proxies set in the environment (``HTTPS_PROXY``, ...), httpx's own client
    instead: httpx honours them only when no transport is given.
    """
    return httpx.Client() if _environment_proxies() else httpx.Client(transport=SpreadTransport())


def async_client() -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` over ``AsyncioTransport``; with proxies, as ``spread_client``."""
    if _environment_proxies():
        return httpx.AsyncClient()
    return httpx.AsyncClient(transport=AsyncioTransport())
