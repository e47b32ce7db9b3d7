"""``AsyncTuningClient``: the tuning API over an ``httpx.AsyncClient``.

It drives the same plans (``plans``) as ``TuningClient``, awaiting each request and
each wait; its calls and their arguments are those of ``TuningClient``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from lightning_moondream.api import operations as ops
from lightning_moondream.api.core import Attempts, ClientCore, Done
from lightning_moondream.api.errors import TuningAPIError
from lightning_moondream.api.inprocess import InProcessAsyncTransport
from lightning_moondream.api.limits import DEFAULT_PAGE_SIZE
from lightning_moondream.api.models import (
    Adapter,
    AdapterPage,
    AnyRequest,
    Checkpoint,
    CheckpointPage,
    GroundTruth,
    RolloutsResponse,
    TrainStepResult,
)
from lightning_moondream.api.plans import Plan, RolloutCall
from lightning_moondream.api.pools import async_spread_client

if TYPE_CHECKING:
    from typing_extensions import Self

T = TypeVar("T")


class AsyncAdapters:
    """``client.adapters`` of the async client; see ``Adapters``."""

    def __init__(self, client: AsyncTuningClient) -> None:
        self._client = client

    async def create(self, name: str, rank: int, from_checkpoint: str | None = None) -> Adapter:
        """Create an adapter; see ``Adapters.create``."""
        plan = self._client._plans.create_adapter(name, rank, from_checkpoint)
        return await self._client._drive(plan)

    async def get(self, adapter_id: str) -> Adapter:
        """Describe one adapter; in ``auto`` this is how the dialect is found."""
        return await self._client._drive(self._client._plans.get_adapter(adapter_id))

    async def list(self, limit: int = DEFAULT_PAGE_SIZE, cursor: str | None = None) -> AdapterPage:
        """One page of adapters (finetunes, oldest first), with the next page's cursor."""
        return await self._client._drive(self._client._plans.list_adapters(limit, cursor))

    async def iter(self, limit: int = DEFAULT_PAGE_SIZE) -> AsyncIterator[Adapter]:
        """Every adapter, across pages."""
        cursor = None
        while True:
            page = await self.list(limit=limit, cursor=cursor)
            for item in page.items:
                yield item
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def delete(self, adapter_id: str) -> None:
        """Delete an adapter and all its checkpoints."""
        await self._client._drive(self._client._plans.delete_adapter(adapter_id))


class AsyncCheckpoints:
    """``client.checkpoints`` of the async client; see ``Checkpoints``."""

    def __init__(self, client: AsyncTuningClient) -> None:
        self._client = client

    async def save(self, adapter_id: str) -> Checkpoint:
        """Save the adapter's current state as a checkpoint; see ``Checkpoints.save``."""
        return await self._client._drive(self._client._plans.save_checkpoint(adapter_id))

    async def list(
        self, adapter_id: str, limit: int = DEFAULT_PAGE_SIZE, cursor: str | None = None
    ) -> CheckpointPage:
        """One page of an adapter's checkpoints."""
        plan = self._client._plans.list_checkpoints(adapter_id, limit, cursor)
        return await self._client._drive(plan)

    async def iter(
        self, adapter_id: str, limit: int = DEFAULT_PAGE_SIZE
    ) -> AsyncIterator[Checkpoint]:
        """Every checkpoint of an adapter, across pages."""
        cursor = None
        while True:
            page = await self.list(adapter_id, limit=limit, cursor=cursor)
            for item in page.items:
                yield item
            if not page.next_cursor:
                return
            cursor = page.next_cursor

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


class AsyncTuningClient(ClientCore[httpx.AsyncClient]):
    """Asynchronous client of the Moondream tuning API; arguments as ``TuningClient``.

    Raises:
        MissingAPIKeyError: If no API key is given or set.
    """

    @cached_property
    def adapters(self) -> AsyncAdapters:
        """Create, read, list and delete adapters (finetunes)."""
        return AsyncAdapters(self)

    @cached_property
    def checkpoints(self) -> AsyncCheckpoints:
        """Save, list and delete checkpoints of an adapter."""
        return AsyncCheckpoints(self)

    @cached_property
    def metrics(self) -> AsyncMetrics:
        """Log metrics of a train step, and read them back (``/finetunes``)."""
        return AsyncMetrics(self)

    async def _sleep(self, seconds: float) -> None:
        """Wait before retrying (a test gives the client a fake one)."""
        await asyncio.sleep(seconds)

    def _default_http_client(self) -> httpx.AsyncClient:
        return async_spread_client()

    @classmethod
    def _in_process_http_client(cls, app: Any, on_close: Callable[[], None]) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=InProcessAsyncTransport(app, on_close=on_close))

    async def _execute(self, operation: ops.Operation[T]) -> T:
        request = self._build_request(operation)
        attempts = Attempts()
        delay: float | None = None  # before a retry: the wait it asks for
        while True:
            turn = self.rate_limiter.reserve(delay or 0.0)
            if delay is not None or turn.wait > 0:
                await self._sleep(turn.wait)
            started = time.perf_counter()
            outcome: httpx.Response | httpx.RequestError
            try:
                outcome = await self._http.send(request)
            except httpx.RequestError as exc:
                outcome = exc
            elapsed = time.perf_counter() - started
            step = self._settle(
                operation, attempts, outcome, turn.at, elapsed, len(request.content)
            )
            if isinstance(step, Done):
                return step.value
            delay = step

    async def _drive(self, plan: Plan[T]) -> T:
        try:
            operation = next(plan)
            while True:
                try:
                    result = await self._execute(operation)
                except TuningAPIError as exc:
                    operation = plan.throw(exc)
                else:
                    operation = plan.send(result)
        except StopIteration as stop:
            return stop.value

    async def rollouts(
        self,
        adapter_id: str,
        request: AnyRequest | Mapping[str, Any],
        num_rollouts: int,
        ground_truth: GroundTruth | Mapping[str, Any] | None = None,
    ) -> RolloutsResponse:
        """Sample ``num_rollouts`` attempts at a request; see ``TuningClient.rollouts``."""
        plan = self._plans.rollouts(adapter_id, request, num_rollouts, ground_truth)
        return await self._drive(plan)

    async def rollouts_many(
        self, calls: Iterable[RolloutCall], *, max_concurrency: int = 8
    ) -> list[RolloutsResponse]:
        """Run many rollouts requests at once, at most ``max_concurrency`` in flight.

        Every call is validated before any is sent. Results come in input order; the
        first failure cancels the others and is raised. From synchronous code, run it on
        a ``BackgroundLoop`` (``loop.run(client.rollouts_many(calls))``) or ``asyncio.run``.
        """
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        operations = await self._drive(self._plans.rollouts_operations(calls))
        limit = asyncio.Semaphore(max_concurrency)

        async def bounded(operation: ops.Operation[RolloutsResponse]) -> RolloutsResponse:
            async with limit:
                return await self._execute(operation)

        tasks = [asyncio.ensure_future(bounded(operation)) for operation in operations]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def train_step(
        self,
        adapter_id: str,
        groups: Sequence[Mapping[str, Any]],
        *,
        lr: float | None = None,
        **extra: Any,
    ) -> TrainStepResult:
        """Apply one training step; see ``TuningClient.train_step``."""
        return await self._drive(self._plans.train_step(adapter_id, groups, lr, extra))

    async def close(self) -> None:
        """Close the HTTP client if this client created it."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
