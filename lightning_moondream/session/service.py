"""The one rule choosing the service: a remote one (the cloud, a base URL), or the local one.

A local data folder, when named, chooses the local service. Otherwise an API key or a
base URL (given, or from ``MOONDREAM_API_KEY`` / ``MOONDREAM_TUNING_URL``) chooses a
remote service, and with neither the local service runs in this process, keeping its
data under ``<root>/moondream-local-service``. The module, the ``adapters`` and
``evaluate`` commands and :func:`lightning_moondream.evaluation.evaluate_async` callers
all choose through :class:`ServiceChoice`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from lightning_moondream.api import AsyncTuningClient, TuningClient
from lightning_moondream.api.client import DialectChoice, check_dialect

LOCAL_SERVICE_DIR = "moondream-local-service"
"""Folder of the local service's data, under a root folder (the trainer's, or the current one)."""

LOCAL_SCORES_NOTE = "it trains and scores its own small model, not Moondream"
"""What the local service's rewards and metrics measure, said wherever they are shown."""

_CHOSEN_BY = ("base_url", "dialect", "max_retries", "timeout")
"""The values :meth:`ServiceChoice.of` takes as they are."""

_SEARCH_DEPTH = 3
"""Folder levels searched under a named folder for the local service's data."""


class NoLocalServiceDataError(ValueError):
    """A folder named as the local service's data holds none (nothing is created there)."""


def local_service_folders(folder: Path) -> list[Path]:
    """The local service data folders at most a few levels under ``folder``, sorted.

    A run keeps its data in ``<default_root_dir>/moondream-local-service``, so a run's
    folder, or a folder of runs, names where the data is.
    """
    # Imported where local data is looked for: the server package loads FastAPI.
    from lightning_moondream.server.store import DATABASE_FILE

    found: list[Path] = []
    for depth in range(_SEARCH_DEPTH):
        pattern = "/".join(["*"] * depth + [LOCAL_SERVICE_DIR, DATABASE_FILE])
        found += (database.parent for database in folder.glob(pattern))
    return sorted(found)


@dataclass(frozen=True)
class ServiceChoice:
    """Which service to talk to, and how.

    Attributes:
        api_key: Moondream API key; ``MOONDREAM_API_KEY`` when ``None``. Never shown.
        base_url: API base URL; ``MOONDREAM_TUNING_URL`` or Moondream Cloud when ``None``.
        local_dir: Data folder of a local service; naming it chooses the local service.
        local_options: Further options of the local service (``create_app`` arguments;
            a ``data_dir`` among them is its folder without forcing the choice).
        dialect: The wire dialect to speak; the client settles ``auto``.
        max_retries: Retries of failed requests where retrying is safe.
        timeout: Seconds per request; ``None`` for the client's defaults.
    """

    api_key: SecretStr | None = field(default=None, repr=False)
    base_url: str | None = None
    local_dir: str | None = None
    local_options: Mapping[str, Any] = field(default_factory=dict)
    dialect: DialectChoice = "auto"
    max_retries: int = 4
    timeout: float | None = None

    def __post_init__(self) -> None:
        check_dialect(self.dialect)

    @classmethod
    def of(cls, values: Mapping[str, Any], api_key: SecretStr | str | None = None) -> ServiceChoice:
        """The choice among ``values`` (e.g. a module's hyperparameters); others are left.

        Args:
            values: ``base_url``, ``dialect``, ``max_retries``, ``timeout`` and
                ``local_service`` (the local service's options), each where given.
            api_key: The API key, kept apart from ``values`` as it is never saved.
        """
        given = {name: values[name] for name in _CHOSEN_BY if name in values}
        return cls(
            api_key=SecretStr(api_key) if isinstance(api_key, str) else api_key,
            local_options=dict(values.get("local_service") or {}),
            **given,
        )

    @property
    def uses_local_service(self) -> bool:
        """Whether the local service serves: a local folder is named, or no key and no URL."""
        if self.local_dir is not None:
            return True
        return (
            self.api_key is None
            and not os.environ.get("MOONDREAM_API_KEY")
            and self.base_url is None
            and not os.environ.get("MOONDREAM_TUNING_URL")
        )

    def data_dir(self, root: str | Path = ".") -> str:
        """Where the local service keeps its adapters, for a run rooted at ``root``."""
        chosen = self.local_dir or self.local_options.get("data_dir")
        return str(chosen or Path(root) / LOCAL_SERVICE_DIR)

    def existing_data_dir(self, root: str | Path = ".") -> str:
        """The local service's data folder, for reading: it must hold the service's data.

        Raises:
            NoLocalServiceDataError: If the folder holds no local service data, naming
                it, how it was chosen and the data folders found under it.
        """
        from lightning_moondream.server.store import DATABASE_FILE

        folder = Path(self.data_dir(root))
        if (folder / DATABASE_FILE).is_file():
            return str(folder)
        named = self.local_dir is not None
        chosen = "--local-dir" if named else "no key, no base URL: the default folder"
        message = f"{folder} ({chosen}) holds no local tuning service data (no {DATABASE_FILE})"
        # A named folder may be a run's; the default one sits in the root, beside the runs.
        searched = folder if named else Path(root)
        found = local_service_folders(searched) if searched.is_dir() else []
        if found:
            where = ", ".join(str(path) for path in found)
            raise NoLocalServiceDataError(f"{message}; it is in {where}: pass that as --local-dir")
        raise NoLocalServiceDataError(
            f"{message}. A run keeps it in <default_root_dir>/{LOCAL_SERVICE_DIR}: pass that "
            "folder as --local-dir, or set MOONDREAM_API_KEY for Moondream Cloud"
        )

    def service_options(self, root: str | Path = ".") -> dict[str, Any]:
        """The local service's options, its data folder settled."""
        return {**self.local_options, "data_dir": self.data_dir(root)}

    def announcement(self, root: str | Path = ".", where: str = "in this process") -> str:
        """The one line saying that the local service serves, where, and what it scores."""
        chosen = (
            "--local-dir given"
            if self.local_dir is not None
            else "No MOONDREAM_API_KEY and no base_url"
        )
        return (
            f"{chosen}: using the local tuning service, {where} (data in {self.data_dir(root)}), "
            f"an offline stand-in for Moondream Cloud: {LOCAL_SCORES_NOTE}."
        )

    def async_client(self, root: str | Path = ".") -> AsyncTuningClient:
        """An async client of the chosen service."""
        if not self.uses_local_service:
            return self.remote_async_client(self.api_key, self.base_url)
        client = AsyncTuningClient.local(dialect=self.dialect, **self.service_options(root))
        client.retry_policy.max_retries = self.max_retries
        client.timeout = self.timeout
        return client

    def remote_async_client(
        self, api_key: SecretStr | None, base_url: str | None
    ) -> AsyncTuningClient:
        """An async client of a service over HTTP, with this choice's dialect and limits."""
        return AsyncTuningClient(
            api_key=api_key,
            base_url=base_url,
            timeout=self.timeout,
            max_retries=self.max_retries,
            dialect=self.dialect,
        )

    def client(self, root: str | Path = ".") -> TuningClient:
        """A synchronous client of the chosen service."""
        if not self.uses_local_service:
            return TuningClient(
                api_key=self.api_key,
                base_url=self.base_url,
                timeout=self.timeout,
                max_retries=self.max_retries,
                dialect=self.dialect,
            )
        client = TuningClient.local(dialect=self.dialect, **self.service_options(root))
        client.retry_policy.max_retries = self.max_retries
        client.timeout = self.timeout
        return client
