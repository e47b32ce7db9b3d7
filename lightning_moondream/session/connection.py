"""The session's line to the service: the client of the chosen service and its event loop.

In one process the local service runs inside it, with no port. In a multi-process run
one process (rank 0) serves it on 127.0.0.1 and shares the URL and a fresh key with the
others through the run's collectives, never through a file or a log.

The connection also paces its client: its share of the key's rate (``rate_share``),
granted at ``prepare`` and again at every train step, and how many requests it keeps in
flight (``in_flight``).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from pydantic import SecretStr

from lightning_moondream.api import AsyncTuningClient, BackgroundLoop, UsageStats
from lightning_moondream.api.client import LOCAL_API_KEY, DialectChoice
from lightning_moondream.api.limiter import Turns
from lightning_moondream.distributed import Collective
from lightning_moondream.session.rate_share import Pace, RateShare
from lightning_moondream.session.service import ServiceChoice

T = TypeVar("T")

LATENCY_SAMPLE = 32
"""Latest rollouts answers whose latency sets how many requests are kept in flight."""


class Connection:
    """Connects on first use; reconnects after :meth:`close`.

    Args:
        choice: The service to talk to.
        usage: Where the client counts requests, kept across reconnections.
        info: Says where the local service runs, once.
        requests_per_second: The key's rate, shared by the run's processes; ``None``
            to learn it from the service's 429s.
    """

    def __init__(
        self,
        choice: ServiceChoice,
        usage: UsageStats,
        info: Callable[[str], None],
        requests_per_second: float | None = None,
    ) -> None:
        self.choice = choice
        self.usage = usage
        self._info = info
        self.requests_per_second = requests_per_second
        self._collective = Collective()
        self._share = RateShare(requests_per_second, 1)
        self._granted: float | None = None
        self._root: str | Path = "."
        self._client: AsyncTuningClient | None = None
        self._loop: BackgroundLoop | None = None
        self._shared: tuple[str, SecretStr] | None = None
        self._server: Any = None
        self._served_app: Any = None
        self._announced = False
        self._settled: DialectChoice | None = None

    def __repr__(self) -> str:
        where = "local service" if self.uses_local_service else (self.choice.base_url or "cloud")
        return f"Connection({where})"

    @property
    def uses_local_service(self) -> bool:
        """Whether the local service serves (see :class:`ServiceChoice`)."""
        return self.choice.uses_local_service

    @property
    def dialect(self) -> DialectChoice | None:
        """The dialect the service speaks: as settled by a client, ``None`` before one knows.

        Once settled it is given to every client this connection makes after.
        """
        return self._settled or (self._client.dialect if self._client is not None else None)

    def settle(self, dialect: DialectChoice | None) -> None:
        """Keep the dialect a client settled (in a multi-process run, rank 0's)."""
        self._settled = dialect

    @property
    def connected(self) -> bool:
        """Whether a client is open now."""
        return self._client is not None

    def prepare(self, collective: Collective, root_dir: str | Path) -> None:
        """Settle where the local service lives, on every rank at the same point.

        With several processes, rank 0 starts the one local service of the run and the
        others learn its URL and key; with one, the service will run in this process.
        Each process is granted its share of the key's rate.

        Args:
            collective: The run's collectives.
            root_dir: The run's root folder, home of the local service's data.
        """
        self._root = root_dir
        if collective is not self._collective:
            self._collective = collective
            self._share = RateShare(self.requests_per_second, collective.world_size)
            self.follow(self._share.key_rate)
            if self._granted is None and self._client is not None:
                self._take_turns(self._client)
        # Each stage says again what it trains or scores: a test after fit is read apart.
        self._announced = False
        if not self.uses_local_service:
            return
        if not collective.distributed:
            # Said at the stage's start rather than at its first request, mid progress bar.
            self._announce("in this process")
            return
        if self._shared:
            return
        self._shared = collective.on_zero(self._serve)

    def pace(self) -> Pace:
        """What this process's rate limiter knows now, for rank 0 to share the key's rate."""
        rate = self._client.rate_limiter.rate if self._client is not None else None
        return Pace(rate, self.usage.rate_limited)

    def rate_share(self, paces: list[Pace]) -> float | None:
        """The key's rate for the next step, from every process's pace (on rank 0)."""
        return self._share.update(paces)

    def follow(self, key_rate: float | None) -> None:
        """Take this process's share of the key's rate, as rank 0 granted it."""
        if key_rate is None or key_rate == self._granted:
            return
        self._granted = key_rate
        if self._client is not None:
            self._take_turns(self._client)

    def _take_turns(self, client: AsyncTuningClient) -> None:
        """Send on this process's turns: of the rate granted, else of the key's tier."""
        rank, processes = self._collective.rank, self._collective.world_size
        if self._granted is None:
            client.rate_limiter.share(rank, processes)
            return
        turns = Turns.of(self._granted, rank, processes)
        client.rate_limiter.set_rate(turns.rate, phase=turns.phase)

    def in_flight(self) -> int | None:
        """Requests to keep in flight: Little's law, once a rate and a latency are known.

        The admitted rate times the latency (its 90th percentile over the latest
        answers), plus one so that a slow answer does not leave a turn unused. ``None``
        while nothing limits the rate or no answer has come: then the caller decides.
        """
        rate = self._client.rate_limiter.rate if self._client is not None else None
        latencies = sorted(self.usage.latencies("POST /rollouts")[-LATENCY_SAMPLE:])
        if rate is None or not latencies:
            return None
        latency = latencies[math.ceil(0.9 * len(latencies)) - 1]
        return math.ceil(rate * latency) + 1

    def _serve(self) -> tuple[str, SecretStr]:
        from lightning_moondream.server import create_app
        from lightning_moondream.server.threaded import ThreadedServer

        key = SecretStr(secrets.token_urlsafe(24))
        # The run's adapters stay the local key's, for a later one-process stage.
        app = create_app(
            api_keys=[key.get_secret_value()],
            owner_key=LOCAL_API_KEY,
            **self.choice.service_options(self._root),
        )
        self._served_app = app
        self._server = ThreadedServer(app).start()
        self._announce(f"served on 127.0.0.1:{self._server.port} to every process of the run")
        return self._server.url, key

    @property
    def client(self) -> AsyncTuningClient:
        """The API client, connected on first use."""
        if self._client is None:
            client = self._connect()
            client.usage = self.usage
            self._take_turns(client)
            self._loop, self._client = BackgroundLoop(), client
        return self._client

    def _connect(self) -> AsyncTuningClient:
        settled = self.dialect
        choice = self.choice if settled is None else replace(self.choice, dialect=settled)
        if self._shared is not None:
            url, key = self._shared
            return choice.remote_async_client(key, url)
        if self.uses_local_service:
            self._announce("in this process")
        return choice.async_client(self._root)

    def _announce(self, where: str) -> None:
        if not self._announced:
            self._announced = True
            self._info(self.choice.announcement(self._root, where))

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the client's loop and wait for its result."""
        return self._running_loop().run(coroutine)

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Start a coroutine on the client's loop; its future holds the result."""
        return self._running_loop().submit(coroutine)

    def _running_loop(self) -> BackgroundLoop:
        self.client  # noqa: B018 - connect before the loop is needed
        assert self._loop is not None
        return self._loop

    def close(self) -> None:
        """Close the client and its loop (a later use reconnects)."""
        client, loop = self._client, self._loop
        self._client, self._loop = None, None
        if client is not None:
            self._settled = self._settled or client.dialect
        if client is not None and loop is not None:
            try:
                loop.run(client.close())
            finally:
                loop.close()

    def shutdown(self) -> None:
        """Close, and stop the local service this process serves to the others, if any."""
        try:
            self.close()
        finally:
            server, self._server, self._shared = self._server, None, None
            app, self._served_app = self._served_app, None
            if server is not None:
                from lightning_moondream.server import close_app

                server.stop()
                close_app(app)
