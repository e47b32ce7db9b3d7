"""The clients' own HTTP transports.

The blocking clients send through ``BlockingTransport``, the async ones through
``AsyncioTransport``: both keep idle connections in a list per origin, so what a
request costs does not grow with the requests in flight. httpcore 1.0's pool walks
every one of its connections, polling each idle socket, whenever a request starts or
ends: with 32 requests in flight on one pool, that delayed the last answer of a batch
by about 150 ms on two cores, and the blocking clients used to spread their requests
over 8 small pools to keep each walk short. Over ``BlockingTransport``, a batch of 32
``/rollouts`` requests at 200 ms of latency takes as long as it did over those pools
(239 ms against 243).
"""

from __future__ import annotations

import urllib.request

from lightning_moondream.api.async_transport import AsyncioTransport
from lightning_moondream.api.blocking_transport import BlockingTransport


def _environment_proxies() -> bool:
    return any(scheme != "no" for scheme in urllib.request.getproxies())


def blocking_transport() -> BlockingTransport | None:
    """The blocking clients' own transport; ``None`` with proxies set in the environment.

    With proxies (``HTTPS_PROXY``, ...) the client is httpx's own: httpx honours them
    only when no transport is given.
    """
    return None if _environment_proxies() else BlockingTransport()


def async_transport() -> AsyncioTransport | None:
    """The async clients' own transport; ``None`` with proxies, as ``blocking_transport``."""
    return None if _environment_proxies() else AsyncioTransport()
