"""What the HTTP/1.1 transports (``AsyncioTransport``, ``BlockingTransport``) share.

Where a connection goes, whether an idle one is still fit to send on, and how many
connections a transport opens and keeps, with its TLS context.
"""

from __future__ import annotations

import select
import socket
import ssl
from typing import NamedTuple

import httpx

MAX_CONNECTIONS = 100
"""Requests in flight at once, each on its own connection (httpx's default)."""
MAX_KEEPALIVE = 20
"""Idle connections kept open for reuse (httpx's default)."""
KEEPALIVE_EXPIRY = 5.0
"""Seconds an idle connection is kept (httpx's default; uvicorn closes them after 5)."""
WRITE_CHUNK = 64 * 1024
"""Bytes of a request gathered into one write."""


class Origin(NamedTuple):
    """Where a connection goes: scheme, host and port."""

    scheme: str
    host: str
    port: int


def origin_of(url: httpx.URL) -> Origin:
    """The origin a request's URL names.

    Raises:
        httpx.UnsupportedProtocol: For a scheme other than ``http`` or ``https``.
    """
    if url.scheme not in ("http", "https"):
        raise httpx.UnsupportedProtocol(f"request URL {url} has no http or https scheme")
    return Origin(url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))


def readable(sock: socket.socket) -> bool:
    """Whether bytes (or the end of the stream) wait on an idle socket.

    Either means the connection is no longer fit to send on: the server closed it, or
    sent what no request asked for.
    """
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])


class ConnectionSettings:
    """How many connections a transport opens and keeps, and its TLS context.

    The defaults of the transports' arguments are httpx's: ``MAX_CONNECTIONS``,
    ``MAX_KEEPALIVE``, ``KEEPALIVE_EXPIRY``.

    Args:
        max_connections: Requests in flight at once; more wait for a free one, first
            come first served, at most the request's ``pool`` timeout.
        max_keepalive: Idle connections kept open for reuse.
        keepalive_expiry: Seconds an idle connection is kept.

    Raises:
        ValueError: If ``max_connections`` is below 1.
    """

    def __init__(self, max_connections: int, max_keepalive: int, keepalive_expiry: float) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.max_connections = max_connections
        self.max_keepalive = max_keepalive
        self.keepalive_expiry = keepalive_expiry
        self._tls: ssl.SSLContext | None = None

    def tls(self) -> ssl.SSLContext:
        """TLS with httpx's certificates, for HTTP/1.1.

        Made on first use, as making one reads the certificate bundle (milliseconds);
        threads that need it at once may each make one, and any of them serves.
        """
        if self._tls is None:
            context = httpx.create_ssl_context()
            context.set_alpn_protocols(["http/1.1"])
            self._tls = context
        return self._tls
