"""``AsyncTuningClient``: the tuning API over an ``httpx.AsyncClient``.

It drives the same plans (``plans``) as ``TuningClient``, awaiting each request and
each wait; its calls and their arguments are those of ``TuningClient``.
"""

from __future__ import annotations

from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from functools import cached_property
from typing import Any, Protocol, TypeVar

import httpx

from lightning_moondream.api import models
from lightning_moondream.api import operations as ops
from lightning_moondream.api.core import ClientCore
from lightning_moondream.api.drivers import AsyncDriver, check_concurrency
from lightning_moondream.api.limits import DEFAULT_PAGE_SIZE
from lightning_moondream.api.plans import Plan, RolloutCall

T = TypeVar("T")
ItemT_co = TypeVar("ItemT_co", covariant=True)


class _Page(Protocol[ItemT_co]):
    """One page of a list, as the list endpoints answer it."""

    @property
    def items(self) -> Sequence[ItemT_co]:
        """The page's items."""

    @property
    def next_cursor(self) -> str | None:
        """The cursor of the next page; none on the last."""


async def _every_item(page_at: Callable[[str | None], Awaitable[_Page[T]]]) -> AsyncIterator[T]:
    """Every item of a list, across pages; ``page_at(cursor)`` reads one page."""
    cursor = None
    while True:
        page = await page_at(cursor)
        for item in page.items:
            yield item
        if not page.next_cursor:
            return
        cursor = page.next_cursor


class AsyncAdapters:
    """``client.adapters`` of the async client; see ``Adapters``."""

    def __init__(self, client: AsyncTuningClient) -> None:
        self._client = client

    async def create(
        self, name: str, rank: int, from_checkpoint: str | None = None
    ) -> models.Adapter:
        """Create an adapter; see ``Adapters.create``."""
        plan = self._client._plans.create_adapter(name, rank, from_checkpoint)
        return await self._client._drive(plan)

    async def get(self, adapter_id: str) -> models.Adapter:
        """Describe one adapter; in ``auto`` this is how the dialect is found."""
        return await self._client._drive(self._client._plans.get_adapter(adapter_id))

    async def list(
        self, limit: int = DEFAULT_PAGE_SIZE, cursor: str | None = None
    ) -> models.AdapterPage:
        """One page of adapters (finetunes, oldest first), with the next page's cursor."""
        return await self._client._drive(self._client._plans.list_adapters(limit, cursor))

    def iter(self, limit: int = DEFAULT_PAGE_SIZE) -> AsyncIterator[models.Adapter]:
        """Every adapter, across pages."""
        return _every_item(lambda cursor: self.list(limit=limit, cursor=cursor))

    async def delete(self, adapter_id: str) -> None:
        """Delete an adapter and all its checkpoints."""
        await self._client._drive(self._client._plans.delete_adapter(adapter_id))


class AsyncCheckpoints:
    """``client.checkpoints`` of the async client; see ``Checkpoints``."""

    def __init__(self, client: AsyncTuningClient) -> None:
        self._client = client

    async def save(self, adapter_id: str) -> models.Checkpoint:
        """Save the adapter's current state as a checkpoint; see ``Checkpoints.save``."""
        return await self._client._drive(self._client._plans.save_checkpoint(adapter_id))

    async def list(
        self, adapter_id: str, limit: int = DEFAULT_PAGE_SIZE, cursor: str | None = None
    ) -> models.CheckpointPage:
        """One page of an adapter's checkpoints."""
        plan = self._client._plans.list_checkpoints(adapter_id, limit, cursor)
        return await self._client._drive(plan)

    def iter(
        self, adapter_id: str, limit: int = DEFAULT_PAGE_SIZE
    ) -> AsyncIterator[models.Checkpoint]:
        """Every checkpoint of an adapter, across pages."""
        return _every_item(lambda cursor: self.list(adapter_id, limit=limit, cursor=cursor))

    async def delete(self, ref: str) -> None:
        """Delete a checkpoint by its ``ref``; see ``Checkpoints.delete``."""
        await self._client._execute(ops.delete_checkpoint(ref))


class AsyncMetrics:
    """``client.metrics`` of the async client; see ``Metrics``."""

    def __init__(self, client: AsyncTuningClient) -> None:
        self._client = client

    async def log(self, adapter_id: str, step: int, metrics: Mapping[str, float]) -> int:
        """Log named finite values for a step; see ``Metrics.log``."""
        return await self._client._drive(self._client._plans.log_metrics(adapter_id, step, metrics))

    async def read(self, adapter_id: str) -> list[dict[str, Any]]:
        """Every logged metric (local service only)."""
        return await self._client._drive(self._client._plans.read_metrics(adapter_id))


class AsyncTuningClient(AsyncDriver, ClientCore[httpx.AsyncClient]):
    """Asynchronous client of the Moondream tuning API; arguments as ``TuningClient``.

    Raises:
        MissingAPIKeyError: If no API key is given or set.
    """

    # Each namespace is made on first use, from the client.
    adapters = cached_property(AsyncAdapters)
    checkpoints = cached_property(AsyncCheckpoints)
    metrics = cached_property(AsyncMetrics)

    # Plain functions handing back ``_run``'s coroutine, so that awaiting one awaits
    # ``_run`` itself, one frame less between a caller and the request.
    def _execute(self, operation: ops.Operation[T]) -> Coroutine[Any, Any, T]:
        return self._run(self._attempts(operation))

    def _drive(self, plan: Plan[T]) -> Coroutine[Any, Any, T]:
        return self._run(self._steps(plan))

    async def rollouts_many(
        self, calls: Iterable[RolloutCall], *, max_concurrency: int = 8
    ) -> list[models.RolloutsResponse]:
        """Run many rollouts requests at once, at most ``max_concurrency`` in flight.

        Every call is validated before any is sent. Results come in input order; the
        first failure cancels the others and is raised. From synchronous code, run it on
        a ``BackgroundLoop`` (``loop.run(client.rollouts_many(calls))``) or ``asyncio.run``.
        """
        check_concurrency(max_concurrency)
        operations = await self._drive(self._plans.rollouts_operations(calls))
        return await self._concurrently(self._execute, operations, max_concurrency)

    async def train_step(
        self,
        adapter_id: str,
        groups: Sequence[Mapping[str, Any]],
        *,
        lr: float | None = None,
        **extra: Any,
    ) -> models.TrainStepResult:
        """Apply one training step; see ``TuningClient.train_step``."""
        return await self._drive(self._plans.train_step(adapter_id, groups, lr, extra))
