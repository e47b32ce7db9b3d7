"""``TuningClient``: the tuning API over a blocking ``httpx.Client``.

Every call is a plan (``plans``): each operation the plan yields is sent, retried where
safe, and its result or error handed back to the plan, in steps (``ClientCore._steps``)
that the blocking driver (``drivers.BlockingDriver``) carries out.

Example:
    >>> from lightning_moondream.api import TuningClient
    >>> with TuningClient.local() as client:  # the in-process local service
    ...     adapter = client.adapters.create("shapes", rank=16)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import Any, TypeVar

import httpx

from lightning_moondream.api import models
from lightning_moondream.api import operations as ops
from lightning_moondream.api.core import ClientCore
from lightning_moondream.api.drivers import BlockingDriver, check_concurrency
from lightning_moondream.api.limits import DEFAULT_PAGE_SIZE
from lightning_moondream.api.plans import Plan, RolloutCall

T = TypeVar("T")


class Adapters:
    """``client.adapters``: create, read, list and delete adapters (finetunes)."""

    def __init__(self, client: TuningClient) -> None:
        self._client = client

    def create(self, name: str, rank: int, from_checkpoint: str | None = None) -> models.Adapter:
        """Create an adapter, optionally starting from a checkpoint ``adapter_id/chk_id``.

        ``rank`` is 16 or 32 on ``/adapters``; 8, 16, 24 or 32 on ``/finetunes``. A
        creation of unknown outcome (timeout, dropped connection, 5xx) is settled without
        making a second adapter: ``/finetunes`` is idempotent by name and rank, so it is
        sent again; on ``/adapters`` the one created is found by listing adapters.

        Raises:
            AmbiguousRequestError: If an ``/adapters`` creation's outcome stays unknown.
            ConflictError: On ``/finetunes``, a finetune of that name has another rank.
            InvalidRequestError: A rank the client's dialect does not accept (nothing sent).
            UnsupportedFeatureError: ``from_checkpoint`` on ``/finetunes``.
        """
        return self._client._drive(self._client._plans.create_adapter(name, rank, from_checkpoint))

    def get(self, adapter_id: str) -> models.Adapter:
        """Describe one adapter; in ``auto`` this is how the dialect is found."""
        return self._client._drive(self._client._plans.get_adapter(adapter_id))

    def list(self, limit: int = DEFAULT_PAGE_SIZE, cursor: str | None = None) -> models.AdapterPage:
        """One page of adapters (finetunes, oldest first), with the next page's cursor."""
        return self._client._drive(self._client._plans.list_adapters(limit, cursor))

    def iter(self, limit: int = DEFAULT_PAGE_SIZE) -> Iterator[models.Adapter]:
        """Every adapter, across pages."""
        cursor = None
        while True:
            page = self.list(limit=limit, cursor=cursor)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def delete(self, adapter_id: str) -> None:
        """Delete an adapter and all its checkpoints."""
        self._client._drive(self._client._plans.delete_adapter(adapter_id))


class Checkpoints:
    """``client.checkpoints``: save, list and delete checkpoints of an adapter."""

    def __init__(self, client: TuningClient) -> None:
        self._client = client

    def save(self, adapter_id: str) -> models.Checkpoint:
        """Save the adapter's current state as a checkpoint.

        An unknown outcome is resolved by listing checkpoints: the newest made since the
        request started is returned, so exactly one checkpoint is tracked per save.

        Raises:
            AmbiguousRequestError: If no checkpoint made since then is found.
        """
        return self._client._drive(self._client._plans.save_checkpoint(adapter_id))

    def list(
        self, adapter_id: str, limit: int = DEFAULT_PAGE_SIZE, cursor: str | None = None
    ) -> models.CheckpointPage:
        """One page of an adapter's checkpoints."""
        return self._client._drive(self._client._plans.list_checkpoints(adapter_id, limit, cursor))

    def iter(self, adapter_id: str, limit: int = DEFAULT_PAGE_SIZE) -> Iterator[models.Checkpoint]:
        """Every checkpoint of an adapter, across pages."""
        cursor = None
        while True:
            page = self.list(adapter_id, limit=limit, cursor=cursor)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def delete(self, ref: str) -> None:
        """Delete a checkpoint by its ``ref``: ``adapter_id/chk_id`` or ``finetune_id@step``.

        On ``/finetunes`` a delete is idempotent: a checkpoint already gone is no error.
        """
        self._client._execute(ops.delete_checkpoint(ref))


class Metrics:
    """``client.metrics``: log metrics of a train step, and read them back (``/finetunes``)."""

    def __init__(self, client: TuningClient) -> None:
        self._client = client

    def log(self, adapter_id: str, step: int, metrics: Mapping[str, float]) -> int:
        """Log named finite values for a step; returns how many the service logged.

        Raises:
            InvalidRequestError: A bad step, name or value (nothing is sent).
            UnsupportedFeatureError: On the ``/adapters`` dialect.
        """
        return self._client._drive(self._client._plans.log_metrics(adapter_id, step, metrics))

    def read(self, adapter_id: str) -> list[dict[str, Any]]:
        """Every logged metric ``{step, name, value, logged_at_ms}`` (local service only)."""
        return self._client._drive(self._client._plans.read_metrics(adapter_id))


class TuningClient(BlockingDriver, ClientCore[httpx.Client]):
    """Synchronous client of the Moondream tuning API.

    Args:
        api_key: The API key; defaults to ``MOONDREAM_API_KEY``. Never logged or shown.
        base_url: Defaults to ``MOONDREAM_TUNING_URL`` or the Moondream Cloud URL.
        timeout: Seconds (or an ``httpx.Timeout``) for every request; by default connect
            10 s, read 120 s, and 900 s for train steps.
        max_retries: Retries of a failed request where retrying is safe.
        http_client: An ``httpx.Client`` to send through (not closed by ``close``).
        dialect: ``"adapters"`` (the spec), ``"finetunes"`` (Moondream Cloud's wire) or
            ``"auto"``: decided once, by the first call (``client.dialect`` then says
            which), with requests that a missing route refuses without acting.
        requests_per_second: The rate the key is admitted at (Moondream Cloud: 2, or 10
            once funded); unset, it is found from the service's 429s. It sets the pace
            shared by every client of the key at this service in the process.
        rate_limiter: A limiter of this client's own instead of the key's shared one
            (``client.rate_limiter``; ``set_rate`` grants a process its share).

    Raises:
        MissingAPIKeyError: If no API key is given or set.
    """

    # Each namespace is made on first use, from the client.
    adapters = cached_property(Adapters)
    checkpoints = cached_property(Checkpoints)
    metrics = cached_property(Metrics)

    def _execute(self, operation: ops.Operation[T]) -> T:
        return self._run(self._attempts(operation))

    def _drive(self, plan: Plan[T]) -> T:
        return self._run(self._steps(plan))

    def rollouts_many(
        self, calls: Iterable[RolloutCall], *, max_concurrency: int = 8
    ) -> list[models.RolloutsResponse]:
        """Run many rollouts requests at once, at most ``max_concurrency`` in flight.

        Every call is validated before any is sent. Results come in input order; the
        first failure cancels the calls not yet started and is raised.
        """
        check_concurrency(max_concurrency)
        operations = self._drive(self._plans.rollouts_operations(calls))
        return self._concurrently(self._execute, operations, max_concurrency)

    def train_step(
        self,
        adapter_id: str,
        groups: Sequence[Mapping[str, Any]],
        *,
        lr: float | None = None,
        **extra: Any,
    ) -> models.TrainStepResult:
        """Apply one training step, never repeated when its outcome is unknown.

        Args:
            adapter_id: The adapter (finetune) to train.
            groups: RL groups (``RolloutsResponse.to_group``) or SFT groups
                ``{"mode": "sft", "request", "target"}`` (``/finetunes`` only).
            lr: Learning rate, finite and >= 0 (``/finetunes`` only).
            **extra: Further ``/train_step`` fields (``/finetunes`` only).

        Returns:
            What the service said about the step; ``None`` fields where it said nothing.

        Raises:
            AmbiguousRequestError: If the step may or may not have been applied.
            UnsupportedFeatureError: SFT groups, ``lr`` or extras on ``/adapters``.
        """
        return self._drive(self._plans.train_step(adapter_id, groups, lr, extra))
