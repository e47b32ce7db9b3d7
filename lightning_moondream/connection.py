"""The module's line to the tuning service: which service, the client, and its event loop.

Moondream Cloud when a key or a base URL is set; otherwise the local tuning service.
In one process the local service runs inside it, with no port. In a multi-process run
one process (rank 0) serves it on 127.0.0.1 and shares the URL and a fresh key with the
others through the run's collectives, never through a file or a log.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from lightning.pytorch.utilities import rank_zero_info
from pydantic import SecretStr

from lightning_moondream.api import AsyncTuningClient, BackgroundLoop, UsageStats
from lightning_moondream.api.client import LOCAL_API_KEY, DialectChoice
from lightning_moondream.distributed import Collective

T = TypeVar("T")

LOCAL_SERVICE_DIR = "moondream-local-service"
"""Folder of the local service's data, under the trainer's root folder."""


class Connection:
    """Connects on first use; reconnects after :meth:`close`.

    Args:
        api_key: Moondream API key; defaults to ``MOONDREAM_API_KEY``. Never saved.
        base_url: API base URL; defaults to ``MOONDREAM_TUNING_URL`` or Moondream Cloud.
        local_service: Options of the local service (``create_app`` arguments).
        dialect: The wire dialect to speak.
        max_retries: Retries of failed requests where retrying is safe.
        timeout: Seconds per request; ``None`` for the client's defaults.
        usage: Where the client counts requests, kept across reconnections.
    """

    def __init__(
        self,
        *,
        api_key: SecretStr | None,
        base_url: str | None,
        local_service: dict[str, Any],
        dialect: DialectChoice,
        max_retries: int,
        timeout: float | None,
        usage: UsageStats,
    ) -> None:
        self._api_key = api_key
        self.base_url = base_url
        self.local_service = dict(local_service)
        self.dialect = dialect
        self.max_retries = max_retries
        self.timeout = timeout
        self.usage = usage
        self._default_data_dir = str(Path.cwd() / LOCAL_SERVICE_DIR)
        self._client: AsyncTuningClient | None = None
        self._loop: BackgroundLoop | None = None
        self._shared: tuple[str, SecretStr] | None = None
        self._server: Any = None
        self._served_app: Any = None
        self._announced = False

    def __repr__(self) -> str:
        where = "local service" if self.uses_local_service else (self.base_url or "cloud")
        return f"Connection({where}, dialect={self.dialect!r})"

    @property
    def uses_local_service(self) -> bool:
        """Whether no key and no base URL are set, so the local service serves."""
        return (
            self._api_key is None
            and not os.environ.get("MOONDREAM_API_KEY")
            and self.base_url is None
            and not os.environ.get("MOONDREAM_TUNING_URL")
        )

    @property
    def data_dir(self) -> str:
        """Where the local service keeps its adapters."""
        return str(self.local_service.get("data_dir") or self._default_data_dir)

    def prepare(self, collective: Collective, root_dir: str | Path) -> None:
        """Settle where the local service lives, on every rank at the same point.

        With several processes, rank 0 starts the one local service of the run and the
        others learn its URL and key; with one, the service will run in this process.

        Args:
            collective: The run's collectives.
            root_dir: The trainer's root folder, home of the local service's data.
        """
        self._default_data_dir = str(Path(root_dir) / LOCAL_SERVICE_DIR)
        if not self.uses_local_service or not collective.distributed or self._shared:
            return
        self._shared = collective.on_zero(self._serve)

    def _serve(self) -> tuple[str, SecretStr]:
        from lightning_moondream.server import create_app
        from lightning_moondream.server.threaded import ThreadedServer

        key = SecretStr(secrets.token_urlsafe(24))
        options = {**self.local_service, "data_dir": self.data_dir}
        # The run's adapters stay the local key's, for a later one-process stage.
        app = create_app(api_keys=[key.get_secret_value()], owner_key=LOCAL_API_KEY, **options)
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
            self._loop, self._client = BackgroundLoop(), client
        return self._client

    def _connect(self) -> AsyncTuningClient:
        if self._shared is not None:
            url, key = self._shared
            return self._remote(key, url)
        if not self.uses_local_service:
            return self._remote(self._api_key, self.base_url)
        self._announce("in this process")
        client = AsyncTuningClient.local(
            dialect=self.dialect, **{**self.local_service, "data_dir": self.data_dir}
        )
        client.retry_policy.max_retries = self.max_retries
        client.timeout = self.timeout
        return client

    def _remote(self, api_key: SecretStr | None, base_url: str | None) -> AsyncTuningClient:
        return AsyncTuningClient(
            api_key=api_key,
            base_url=base_url,
            timeout=self.timeout,
            max_retries=self.max_retries,
            dialect=self.dialect,
        )

    def _announce(self, where: str) -> None:
        if not self._announced:
            self._announced = True
            rank_zero_info(
                "No MOONDREAM_API_KEY and no base_url: training against the local tuning service, "
                f"{where} (data in {self.data_dir}), an offline stand-in for Moondream Cloud."
            )

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the client's loop and wait for its result."""
        self.client  # noqa: B018 - connect before the loop is needed
        assert self._loop is not None
        return self._loop.run(coroutine)

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Start a coroutine on the client's loop; its future holds the result."""
        self.client  # noqa: B018
        assert self._loop is not None
        return self._loop.submit(coroutine)

    def close(self) -> None:
        """Close the client and its loop (a later use reconnects)."""
        client, loop = self._client, self._loop
        self._client, self._loop = None, None
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
