"""The local service over HTTP on 127.0.0.1, served by uvicorn from a thread of this process.

What a multi-process run uses to share one local service: the process that owns it
serves the app, and the others reach it over the loopback interface like any server.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from lightning_moondream.server.http_common import PREFIX

START_TIMEOUT = 30.0
"""Seconds uvicorn may take to start serving before it counts as failed."""


class ThreadedServer:
    """An ASGI app served on 127.0.0.1 from a daemon thread.

    The listening socket is bound before the thread starts, to a port the system
    chooses unless one is given, so the URL is known and taken with no race.

    Args:
        app: The ASGI app to serve, e.g. from ``create_app``.
        port: Port to listen on; ``0`` for any free port.

    Example:
        >>> with ThreadedServer(create_app()) as server:  # doctest: +SKIP
        ...     client = TuningClient(api_key="k", base_url=server.url)
    """

    def __init__(self, app: Any, port: int = 0) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", port))
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="lightning-moondream-local-service",
            daemon=True,
        )

    @property
    def url(self) -> str:
        """Base URL of the tuning API served."""
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    def start(self) -> ThreadedServer:
        """Start serving; returns once requests are answered.

        Raises:
            RuntimeError: If uvicorn stops or does not start within ``START_TIMEOUT``.
        """
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the local tuning service did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving: answers in progress get up to ``START_TIMEOUT`` seconds to finish."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=START_TIMEOUT)
        self._socket.close()

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
