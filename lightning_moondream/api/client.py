"""``TuningClient`` and ``AsyncTuningClient``: the tuning API over httpx.

Both share one definition of every endpoint (``operations``), of the retry policy
(``retry``) and of error mapping (``_ClientCore``); they differ only in how a request is
sent and how a wait is slept.

Example:
    >>> from lightning_moondream.api import TuningClient
    >>> with TuningClient.local() as client:  # the in-process local service
    ...     adapter = client.adapters.create("shapes", rank=16)
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx
from pydantic import SecretStr

from lightning_moondream.api import operations as ops
from lightning_moondream.api import wire
from lightning_moondream.api.errors import (
    AmbiguousRequestError,
    APIConnectionError,
    APITimeoutError,
    MissingAPIKeyError,
    RateLimitError,
    ServerError,
    TuningAPIError,
    error_class_for_status,
)
from lightning_moondream.api.inprocess import InProcessAsyncTransport, InProcessTransport
from lightning_moondream.api.models import (
    Adapter,
    AdapterPage,
    AnyRequest,
    Checkpoint,
    CheckpointPage,
    GroundTruth,
    RolloutsResponse,
)
from lightning_moondream.api.pools import async_spread_client, spread_client
from lightning_moondream.api.retry import (
    CallKind,
    RetryPolicy,
    parse_retry_after,
    should_retry_status,
    should_retry_transport,
)
from lightning_moondream.api.usage import UsageStats

if TYPE_CHECKING:
    from typing_extensions import Self

T = TypeVar("T")
HttpClientT = TypeVar("HttpClientT", httpx.Client, httpx.AsyncClient)

DEFAULT_BASE_URL = "https://api.moondream.ai/v1/tuning"
LOCAL_BASE_URL = "http://local.invalid/v1/tuning"
LOCAL_API_KEY = "local"
CONNECT_TIMEOUT = 10.0
MIN_SCRUBBED_KEY = 8
USER_AGENT = "lightning-moondream"


@dataclass(frozen=True)
class RolloutCall:
    """One ``/rollouts`` request for ``rollouts_many``."""

    adapter_id: str
    request: AnyRequest | Mapping[str, Any]
    num_rollouts: int
    ground_truth: GroundTruth | Mapping[str, Any] | None = None

    def operation(self) -> ops.Operation[RolloutsResponse]:
        """Validate the call and build its operation."""
        return ops.rollouts(self.adapter_id, self.request, self.num_rollouts, self.ground_truth)


@dataclass(frozen=True)
class _Done(Generic[T]):
    value: T


def resolve_api_key(api_key: str | SecretStr | None) -> SecretStr:
    """Return the API key from the argument or ``MOONDREAM_API_KEY``.

    Raises:
        MissingAPIKeyError: If neither gives a non-empty key.
    """
    if isinstance(api_key, SecretStr):
        api_key = api_key.get_secret_value()
    key = api_key or os.environ.get("MOONDREAM_API_KEY", "")
    if not key.strip():
        raise MissingAPIKeyError(
            "no API key: pass api_key=... or set the MOONDREAM_API_KEY environment variable"
        )
    return SecretStr(key.strip())


def resolve_base_url(base_url: str | None) -> str:
    """Return the base URL from the argument, ``MOONDREAM_TUNING_URL`` or the default."""
    return (base_url or os.environ.get("MOONDREAM_TUNING_URL") or DEFAULT_BASE_URL).rstrip("/")


class _ClientCore(Generic[HttpClientT]):
    """What both clients share: configuration, building requests, reading answers."""

    _http: HttpClientT

    def __init__(
        self,
        *,
        api_key: str | SecretStr | None,
        base_url: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        http_client: HttpClientT | None,
        default_http_client: Callable[[], HttpClientT],
    ) -> None:
        self._api_key = resolve_api_key(api_key)
        self.base_url = resolve_base_url(base_url)
        self.timeout = timeout
        self.retry_policy = RetryPolicy(max_retries=max_retries)
        self.usage = UsageStats()
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else default_http_client()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, api_key='**********')"

    @classmethod
    def _local(cls, http_client: HttpClientT) -> Self:
        client = cls(  # type: ignore[call-arg]
            api_key=LOCAL_API_KEY, base_url=LOCAL_BASE_URL, http_client=http_client
        )
        # The transport serves an app made for this client alone: close it with the client.
        client._owns_http = True
        return client

    def _timeout(self, operation: ops.Operation[Any]) -> httpx.Timeout:
        if isinstance(self.timeout, httpx.Timeout):
            return self.timeout
        if self.timeout is not None:
            return httpx.Timeout(self.timeout)
        read = operation.read_timeout
        return httpx.Timeout(connect=CONNECT_TIMEOUT, read=read, write=read, pool=read)

    def _build_request(self, operation: ops.Operation[Any]) -> httpx.Request:
        headers = {
            "X-Moondream-Auth": self._api_key.get_secret_value(),
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        content = None
        if operation.json is not None:
            content = wire.dumps(operation.json)
            headers["Content-Type"] = "application/json"
        return self._http.build_request(
            operation.method,
            self.base_url + operation.path,
            params=operation.params,
            content=content,
            headers=headers,
            timeout=self._timeout(operation),
        )

    def _scrub(self, text: str) -> str:
        key = self._api_key.get_secret_value()
        # A key too short to be a secret (the local service's "local") would only mangle
        # ordinary words of the message.
        return text.replace(key, "**********") if len(key) >= MIN_SCRUBBED_KEY else text

    def _status_error(
        self, operation: ops.Operation[Any], response: httpx.Response
    ) -> TuningAPIError:
        request_id = response.headers.get("x-request-id") or response.headers.get("request-id")
        message = _server_message(response)
        text = self._scrub(f"{operation.label} answered {response.status_code}: {message}")
        error_class = error_class_for_status(response.status_code)
        if error_class is RateLimitError:
            return RateLimitError(
                text,
                status_code=response.status_code,
                request_id=request_id,
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        return error_class(text, status_code=response.status_code, request_id=request_id)

    def _transport_error(
        self, operation: ops.Operation[Any], error: httpx.RequestError
    ) -> TuningAPIError:
        what = "timed out" if isinstance(error, httpx.TimeoutException) else "failed"
        text = self._scrub(f"{operation.label} {what}: {type(error).__name__}: {error}")
        if isinstance(error, httpx.TimeoutException):
            return APITimeoutError(text)
        if isinstance(error, httpx.TransportError):
            return APIConnectionError(text)
        # An answer came but could not be read (bad encoding, endless redirects).
        return ServerError(text)

    def _settle(
        self,
        operation: ops.Operation[T],
        attempt: int,
        outcome: httpx.Response | httpx.RequestError,
        elapsed: float,
        bytes_sent: int,
    ) -> _Done[T] | float:
        """Decide what an attempt's outcome means.

        Returns:
            ``_Done`` with the result, or the seconds to wait before retrying.

        Raises:
            TuningAPIError: The typed error, when the call fails for good.
        """
        self.usage.record_attempt(operation.endpoint, elapsed, bytes_sent)
        if isinstance(outcome, httpx.Response) and outcome.is_success:
            return _Done(self._parse(operation, outcome))
        if isinstance(outcome, httpx.Response):
            error = self._status_error(operation, outcome)
            retryable = should_retry_status(operation.kind, outcome.status_code)
            # Only a 5xx leaves a state change in doubt; a 4xx is the server refusing.
            ambiguous = not retryable and outcome.status_code >= 500
        else:
            error = self._transport_error(operation, outcome)
            retryable = should_retry_transport(operation.kind, outcome)
            ambiguous = not retryable
        if retryable and attempt < self.retry_policy.max_retries:
            self.usage.record_retry()
            retry_after = None
            if isinstance(outcome, httpx.Response):
                retry_after = parse_retry_after(outcome.headers.get("retry-after"))
            return self.retry_policy.delay(attempt, retry_after)
        self.usage.record_failure()
        if ambiguous and operation.kind is CallKind.STATE_CHANGING:
            raise AmbiguousRequestError(operation.label, error)
        raise error

    def _parse(self, operation: ops.Operation[T], response: httpx.Response) -> T:
        try:
            data = wire.loads(response.content) if response.content else {}
            result = operation.parse(data)
        except (ValueError, KeyError, TypeError) as exc:
            error = ServerError(
                self._scrub(
                    f"{operation.label} answered something that is not the API's JSON: {exc}"
                ),
                status_code=response.status_code,
            )
            # A success status says the change was made, whatever the body says.
            if operation.kind is CallKind.STATE_CHANGING:
                raise AmbiguousRequestError(operation.label, error) from exc
            raise error from exc
        if isinstance(result, RolloutsResponse):
            self.usage.record_success(rollouts=len(result), images=operation.images)
        elif operation.path == "/train_step":
            self.usage.record_success(train_steps=1)
        return result


def _local_app(
    data_dir: str | Path | None, service_options: dict[str, Any]
) -> tuple[Any, Callable[[], None]]:
    """A local service app made for one client, and how to release it with the client."""
    from lightning_moondream.server import close_app, create_app

    app = create_app(data_dir=data_dir, **service_options)
    return app, lambda: close_app(app)


def _server_message(response: httpx.Response) -> str:
    """The server's own words about an error, from the API's JSON or the body text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if body.get("detail"):
            return str(body["detail"])
        if body.get("message"):
            return str(body["message"])
    return json.dumps(body)[:500]


# Synchronous ----------------------------------------------------------------------------


class Adapters:
    """``client.adapters``: create, read, list and delete adapters."""

    def __init__(self, client: TuningClient) -> None:
        self._client = client

    def create(self, name: str, rank: int, from_checkpoint: str | None = None) -> Adapter:
        """Create an adapter, optionally starting from a checkpoint ``adapter_id/chk_id``."""
        return self._client._execute(ops.create_adapter(name, rank, from_checkpoint))

    def get(self, adapter_id: str) -> Adapter:
        """Describe one adapter."""
        return self._client._execute(ops.get_adapter(adapter_id))

    def list(self, limit: int = 20, cursor: str | None = None) -> AdapterPage:
        """One page of adapters, with the cursor of the next page."""
        return self._client._execute(ops.list_adapters(limit, cursor))

    def iter(self, limit: int = 20) -> Iterator[Adapter]:
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
        self._client._execute(ops.delete_adapter(adapter_id))


class Checkpoints:
    """``client.checkpoints``: save, list and delete checkpoints of an adapter."""

    def __init__(self, client: TuningClient) -> None:
        self._client = client

    def save(self, adapter_id: str) -> Checkpoint:
        """Save the adapter's current state as a checkpoint."""
        return self._client._execute(ops.save_checkpoint(adapter_id))

    def list(self, adapter_id: str, limit: int = 20, cursor: str | None = None) -> CheckpointPage:
        """One page of an adapter's checkpoints."""
        return self._client._execute(ops.list_checkpoints(adapter_id, limit, cursor))

    def iter(self, adapter_id: str, limit: int = 20) -> Iterator[Checkpoint]:
        """Every checkpoint of an adapter, across pages."""
        cursor = None
        while True:
            page = self.list(adapter_id, limit=limit, cursor=cursor)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def delete(self, checkpoint_id: str) -> None:
        """Delete a checkpoint given by its full id ``adapter_id/chk_id``."""
        self._client._execute(ops.delete_checkpoint(checkpoint_id))


class TuningClient(_ClientCore[httpx.Client]):
    """Synchronous client of the Moondream tuning API.

    Args:
        api_key: The API key; defaults to ``MOONDREAM_API_KEY``. Never logged or shown.
        base_url: Defaults to ``MOONDREAM_TUNING_URL`` or the Moondream Cloud URL.
        timeout: Seconds (or an ``httpx.Timeout``) for every request; by default connect
            10 s, read 120 s, and 900 s for train steps.
        max_retries: Retries of a failed request where retrying is safe.
        http_client: An ``httpx.Client`` to send through (not closed by ``close``).

    Raises:
        MissingAPIKeyError: If no API key is given or set.
    """

    def __init__(
        self,
        *,
        api_key: str | SecretStr | None = None,
        base_url: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = 4,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            http_client=http_client,
            default_http_client=spread_client,
        )
        self._sleep: Callable[[float], None] = time.sleep
        self.adapters = Adapters(self)
        self.checkpoints = Checkpoints(self)

    @classmethod
    def local(cls, *, data_dir: str | Path | None = None, **service_options: Any) -> TuningClient:
        """A client of the local tuning service running in this process (no port).

        Args:
            data_dir: Where the service keeps adapters; a temporary folder by default.
            **service_options: Passed to ``lightning_moondream.server.create_app``.
        """
        app, close = _local_app(data_dir, service_options)
        return cls._local(httpx.Client(transport=InProcessTransport(app, on_close=close)))

    def _execute(self, operation: ops.Operation[T]) -> T:
        request = self._build_request(operation)
        attempt = 0
        while True:
            started = time.perf_counter()
            outcome: httpx.Response | httpx.RequestError
            try:
                outcome = self._http.send(request)
            except httpx.RequestError as exc:
                outcome = exc
            step = self._settle(
                operation, attempt, outcome, time.perf_counter() - started, len(request.content)
            )
            if isinstance(step, _Done):
                return step.value
            self._sleep(step)
            attempt += 1

    def rollouts(
        self,
        adapter_id: str,
        request: AnyRequest | Mapping[str, Any],
        num_rollouts: int,
        ground_truth: GroundTruth | Mapping[str, Any] | None = None,
    ) -> RolloutsResponse:
        """Sample ``num_rollouts`` attempts at a request.

        Args:
            adapter_id: The adapter to sample from.
            request: A typed request or the spec's JSON.
            num_rollouts: 1 to 16.
            ground_truth: For point and detect: the server then computes rewards.
        """
        return self._execute(ops.rollouts(adapter_id, request, num_rollouts, ground_truth))

    def rollouts_many(
        self, calls: Iterable[RolloutCall], *, max_concurrency: int = 8
    ) -> list[RolloutsResponse]:
        """Run many rollouts requests at once, at most ``max_concurrency`` in flight.

        Every call is validated before any is sent. Results come in input order; the
        first failure cancels the calls not yet started and is raised.
        """
        operations = [call.operation() for call in calls]
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        with ThreadPoolExecutor(max_workers=max_concurrency) as pool:
            futures = [pool.submit(self._execute, operation) for operation in operations]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def train_step(self, adapter_id: str, groups: Sequence[Mapping[str, Any]]) -> None:
        """Apply one training step with scored groups (``RolloutsResponse.to_group``).

        Raises:
            AmbiguousRequestError: If the step may or may not have been applied.
        """
        self._execute(ops.train_step(adapter_id, groups))

    def close(self) -> None:
        """Close the HTTP client if this client created it."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# Asynchronous ---------------------------------------------------------------------------


class AsyncAdapters:
    """``client.adapters`` of the async client."""

    def __init__(self, client: AsyncTuningClient) -> None:
        self._client = client

    async def create(self, name: str, rank: int, from_checkpoint: str | None = None) -> Adapter:
        """Create an adapter, optionally starting from a checkpoint ``adapter_id/chk_id``."""
        return await self._client._execute(ops.create_adapter(name, rank, from_checkpoint))

    async def get(self, adapter_id: str) -> Adapter:
        """Describe one adapter."""
        return await self._client._execute(ops.get_adapter(adapter_id))

    async def list(self, limit: int = 20, cursor: str | None = None) -> AdapterPage:
        """One page of adapters, with the cursor of the next page."""
        return await self._client._execute(ops.list_adapters(limit, cursor))

    async def iter(self, limit: int = 20) -> AsyncIterator[Adapter]:
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
        await self._client._execute(ops.delete_adapter(adapter_id))


class AsyncCheckpoints:
    """``client.checkpoints`` of the async client."""

    def __init__(self, client: AsyncTuningClient) -> None:
        self._client = client

    async def save(self, adapter_id: str) -> Checkpoint:
        """Save the adapter's current state as a checkpoint."""
        return await self._client._execute(ops.save_checkpoint(adapter_id))

    async def list(
        self, adapter_id: str, limit: int = 20, cursor: str | None = None
    ) -> CheckpointPage:
        """One page of an adapter's checkpoints."""
        return await self._client._execute(ops.list_checkpoints(adapter_id, limit, cursor))

    async def iter(self, adapter_id: str, limit: int = 20) -> AsyncIterator[Checkpoint]:
        """Every checkpoint of an adapter, across pages."""
        cursor = None
        while True:
            page = await self.list(adapter_id, limit=limit, cursor=cursor)
            for item in page.items:
                yield item
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def delete(self, checkpoint_id: str) -> None:
        """Delete a checkpoint given by its full id ``adapter_id/chk_id``."""
        await self._client._execute(ops.delete_checkpoint(checkpoint_id))


class AsyncTuningClient(_ClientCore[httpx.AsyncClient]):
    """Asynchronous client of the Moondream tuning API; arguments as ``TuningClient``."""

    def __init__(
        self,
        *,
        api_key: str | SecretStr | None = None,
        base_url: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = 4,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            http_client=http_client,
            default_http_client=async_spread_client,
        )
        self._sleep: Callable[[float], Any] = asyncio.sleep
        self.adapters = AsyncAdapters(self)
        self.checkpoints = AsyncCheckpoints(self)

    @classmethod
    def local(
        cls, *, data_dir: str | Path | None = None, **service_options: Any
    ) -> AsyncTuningClient:
        """An async client of the local tuning service running in this process.

        Args:
            data_dir: Where the service keeps adapters; a temporary folder by default.
            **service_options: Passed to ``lightning_moondream.server.create_app``.
        """
        app, close = _local_app(data_dir, service_options)
        return cls._local(httpx.AsyncClient(transport=InProcessAsyncTransport(app, on_close=close)))

    async def _execute(self, operation: ops.Operation[T]) -> T:
        request = self._build_request(operation)
        attempt = 0
        while True:
            started = time.perf_counter()
            outcome: httpx.Response | httpx.RequestError
            try:
                outcome = await self._http.send(request)
            except httpx.RequestError as exc:
                outcome = exc
            step = self._settle(
                operation, attempt, outcome, time.perf_counter() - started, len(request.content)
            )
            if isinstance(step, _Done):
                return step.value
            await self._sleep(step)
            attempt += 1

    async def rollouts(
        self,
        adapter_id: str,
        request: AnyRequest | Mapping[str, Any],
        num_rollouts: int,
        ground_truth: GroundTruth | Mapping[str, Any] | None = None,
    ) -> RolloutsResponse:
        """Sample ``num_rollouts`` attempts at a request; see ``TuningClient.rollouts``."""
        return await self._execute(ops.rollouts(adapter_id, request, num_rollouts, ground_truth))

    async def rollouts_many(
        self, calls: Iterable[RolloutCall], *, max_concurrency: int = 8
    ) -> list[RolloutsResponse]:
        """Run many rollouts requests at once, at most ``max_concurrency`` in flight.

        Every call is validated before any is sent. Results come in input order; the
        first failure cancels the others and is raised. From synchronous code, run it on
        a ``BackgroundLoop`` (``loop.run(client.rollouts_many(calls))``) or ``asyncio.run``.
        """
        operations = [call.operation() for call in calls]
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
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

    async def train_step(self, adapter_id: str, groups: Sequence[Mapping[str, Any]]) -> None:
        """Apply one training step; see ``TuningClient.train_step``."""
        await self._execute(ops.train_step(adapter_id, groups))

    async def close(self) -> None:
        """Close the HTTP client if this client created it."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
