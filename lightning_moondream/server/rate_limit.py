"""A per-key rate limit: a token bucket for each ``X-Moondream-Auth`` key.

Each key may send ``rate`` requests per second on average, and a burst of
``max(1, ceil(rate / 5))`` requests at once: a bucket holds that many tokens, refills at
``rate`` tokens a second, and each request that reaches the app takes one. A request
finding the bucket empty is answered ``429`` with the API's error JSON and a
``Retry-After`` header: the seconds until a token is available, rounded up (at least 1).
Every request of an accepted key counts, whatever its route.

The key is checked first, by the service's own rule: a request without one, or with a
key the service refuses, gets no bucket and goes on to be answered ``401``, never
``429``. So no key shares a bucket with another, and made-up keys cannot push real
keys' buckets out of the ``MAX_BUCKETS`` kept. Buckets are keyed by a digest of the key,
never the key itself.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lightning_moondream.api.limits import NO_RATE_LIMIT, RATE_LIMIT_HEADER
from lightning_moondream.server.errors import ServiceError
from lightning_moondream.server.http_common import AUTH_HEADER, authenticated, error_response
from lightning_moondream.server.middleware import HTTPMiddleware

MAX_BUCKETS = 65536
"""Keys whose bucket is kept; the least recently seen beyond this start again full."""

_AUTH_HEADER = AUTH_HEADER.lower().encode()
_ROUNDING = 1e-9
_NO_RATE_LIMIT = (RATE_LIMIT_HEADER.lower().encode(), NO_RATE_LIMIT.encode())


def burst_of(rate: float) -> int:
    """The burst allowed at ``rate`` requests per second: ``max(1, ceil(rate / 5))``."""
    return max(1, math.ceil(rate / 5))


@dataclass
class TokenBucket:
    """Tokens available to one key, as of ``updated``.

    Attributes:
        tokens: Tokens in the bucket (fractional while it refills).
        updated: Clock reading when ``tokens`` was computed.
    """

    tokens: float
    updated: float


class RateLimiter:
    """Token buckets per key: ``rate`` a second, ``burst_of(rate)`` at once.

    Args:
        rate: Requests per second each key may send on average; > 0.
        clock: Seconds from any origin, never going back (``time.monotonic``).
        max_buckets: Keys whose bucket is kept; the least recently seen beyond this
            start again full.

    Raises:
        ValueError: For a rate that is not a positive finite number.
    """

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = MAX_BUCKETS,
    ) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(
                f"rate_limit must be a positive number of requests per second, got {rate!r}"
            )
        self.rate = rate
        self.burst = burst_of(rate)
        self.clock = clock
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def admit(self, key: bytes) -> float:
        """Take a token of ``key``'s bucket: 0 if one was there, else the seconds until one is."""
        now = self.clock()
        digest = hashlib.sha256(key).hexdigest()
        bucket = self._buckets.pop(digest, None) or TokenBucket(float(self.burst), now)
        self._buckets[digest] = bucket
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        # A client that waited exactly the time it was told must not be refused for a
        # rounding error of the refill.
        if bucket.tokens >= 1.0 - _ROUNDING:
            bucket.tokens = max(0.0, bucket.tokens - 1.0)
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


class RateLimit(HTTPMiddleware):
    """ASGI middleware answering ``429`` to a key over its rate (see the module docstring).

    It serves an app of ``create_app``: the key is checked by its service
    (``scope["app"].state.service``).

    Args:
        app: The app to wrap.
        limiter: The keys' buckets.
    """

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        super().__init__(app)
        self.limiter = limiter

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request, if its key is refused (the app says so) or has a token left."""
        try:
            authenticated(Request(scope))
        except ServiceError:
            await self.app(scope, receive, send)
            return
        key = dict(scope["headers"]).get(_AUTH_HEADER, b"")
        wait = self.limiter.admit(key)
        if wait == 0.0:
            await self.app(scope, receive, send)
            return
        retry_after = max(1, math.ceil(wait))
        response = error_response(
            429,
            f"rate limit exceeded: at most {self.limiter.rate:g} requests per second per API key "
            f"(bursts of {self.limiter.burst}); retry in {retry_after} s",
            {"Retry-After": str(retry_after)},
        )
        await response(scope, receive, send)


class NoRateLimit(HTTPMiddleware):
    """ASGI middleware telling, on every answer, that the service sets no rate limit.

    Clients then send as fast as they like rather than at a guess of the key's rate
    (``RATE_LIMIT_HEADER``). A service with a rate limit says nothing, as Moondream
    Cloud does.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request, its answer's head telling there is no rate limit."""

        async def send_told(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), _NO_RATE_LIMIT]}
            await send(message)

        await self.app(scope, receive, send_told)
