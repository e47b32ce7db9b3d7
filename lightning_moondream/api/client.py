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
import logging
import os
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, get_args

import httpx
from pydantic import SecretStr

from lightning_moondream.api import operations as ops
from lightning_moondream.api import wire
from lightning_moondream.api.errors import (
    AmbiguousRequestError,
    APIConnectionError,
    APITimeoutError,
    MissingAPIKeyError,
    NotFoundError,
    RateLimitError,
    ServerError,
    TuningAPIError,
    UnsupportedFeatureError,
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
    TrainStepResult,
)
from lightning_moondream.api.operations import Dialect
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
Plan = Generator["ops.Operation[Any]", Any, T]
"""A call that may take several requests: yields operations, receives their results.

Each client drives a plan with its own way of sending (``_drive``), so the logic of
dialect detection and of resolving an unknown outcome is written once for both.
"""
DialectChoice = Literal["auto", "adapters", "finetunes"]
HttpClientT = TypeVar("HttpClientT", httpx.Client, httpx.AsyncClient)

DEFAULT_BASE_URL = "https://api.moondream.ai/v1/tuning"
LOCAL_BASE_URL = "http://local.invalid/v1/tuning"
LOCAL_API_KEY = "local"
CONNECT_TIMEOUT = 10.0
MIN_SCRUBBED_KEY = 8
USER_AGENT = "lightning-moondream"
CLOCK_SLACK = timedelta(seconds=5)
"""How far the server's clock may run behind ours when matching what a request created."""
MISSING_ROUTE_STATUSES = (404, 405)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutCall:
    """One ``/rollouts`` request for ``rollouts_many``."""

    adapter_id: str
    request: AnyRequest | Mapping[str, Any]
    num_rollouts: int
    ground_truth: GroundTruth | Mapping[str, Any] | None = None

    def operation(self, dialect: Dialect = "finetunes") -> ops.Operation[RolloutsResponse]:
        """Validate the call and build its operation for a dialect."""
        return ops.rollouts(
            self.adapter_id, self.request, self.num_rollouts, self.ground_truth, dialect=dialect
        )


@dataclass(frozen=True)
class _Done(Generic[T]):
    value: T


def check_dialect(dialect: str) -> None:
    """Refuse a dialect name that is not ``auto``, ``adapters`` or ``finetunes``.

    Raises:
        ValueError: Naming the choices and the name given.
    """
    if dialect not in get_args(DialectChoice):
        raise ValueError(
            f"dialect must be one of {', '.join(get_args(DialectChoice))}, got {dialect!r}"
        )


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
        dialect: DialectChoice = "auto",
    ) -> None:
        check_dialect(dialect)
        self.dialect: Dialect | None = None if dialect == "auto" else dialect
        """The dialect the service speaks: as given, detected, or ``None`` before detection."""
        self._detects = dialect == "auto"
        self._api_key = resolve_api_key(api_key)
        self.base_url = resolve_base_url(base_url)
        self.timeout = timeout
        self.retry_policy = RetryPolicy(max_retries=max_retries)
        self.usage = UsageStats()
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else default_http_client()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, dialect={self.dialect!r}, "
            "api_key='**********')"
        )

    # Plans: calls of one or more requests, shared by both clients -----------------------

    def _decide(self, dialect: Dialect) -> None:
        if self.dialect is None:
            self.dialect = dialect
            logger.info("the tuning API at %s speaks the /%s dialect", self.base_url, dialect)

    def _plan_one(self, operation: ops.Operation[T]) -> Plan[T]:
        return (yield operation)

    def _plan_attach(self, adapter_id: str) -> Plan[Adapter]:
        """Read an adapter, finding the dialect from it if not known yet.

        Only ``GET`` requests are sent. A 404 means either a missing route or a missing
        adapter, so the dialect is decided only by a success: an id missing in both
        dialects leaves it undecided.
        """
        if self.dialect is not None:
            return (yield ops.get_adapter(adapter_id, dialect=self.dialect))
        missing: list[str] = []
        order: tuple[Dialect, ...] = ("finetunes", "adapters")
        for dialect in order:
            try:
                adapter = yield ops.get_adapter(adapter_id, dialect=dialect)
            except TuningAPIError as exc:
                if exc.status_code not in MISSING_ROUTE_STATUSES:
                    raise
                missing.append(f"GET /{dialect}/... answered {exc.status_code}")
                continue
            self._decide(dialect)
            return adapter
        raise NotFoundError(
            self._scrub(
                f"adapter {adapter_id!r} not found in either dialect ({'; '.join(missing)})"
            ),
            status_code=404,
        )

    def _plan_dialect_for(self, adapter_id: str) -> Plan[Dialect]:
        if self.dialect is None:
            yield from self._plan_attach(adapter_id)
        assert self.dialect is not None  # attaching decides it or raises
        return self.dialect

    def _plan_create(self, name: str, rank: int, from_checkpoint: str | None) -> Plan[Adapter]:
        """Create an adapter; an unknown outcome is resolved by looking it up."""
        if from_checkpoint is not None and self._detects:
            # Only /adapters creates from a checkpoint, so in auto it is asked there whatever
            # else the service speaks; a service without that route answers 404 and nothing
            # is created.
            adapter = yield from self._plan_create_in("adapters", name, rank, from_checkpoint)
            self._decide("adapters")
            return adapter
        if self.dialect is not None:
            return (yield from self._plan_create_in(self.dialect, name, rank, from_checkpoint))
        try:
            adapter = yield from self._plan_create_in("finetunes", name, rank, None)
        except TuningAPIError as exc:
            # No such route: nothing was created, so the other dialect may be asked.
            if exc.status_code not in MISSING_ROUTE_STATUSES:
                raise
            adapter = yield from self._plan_create_in("adapters", name, rank, None)
            self._decide("adapters")
            return adapter
        self._decide("finetunes")
        return adapter

    def _plan_create_in(
        self, dialect: Dialect, name: str, rank: int, from_checkpoint: str | None
    ) -> Plan[Adapter]:
        operation = ops.create_adapter(name, rank, from_checkpoint, dialect=dialect)
        started = datetime.now(timezone.utc)
        try:
            return (yield operation)
        except AmbiguousRequestError as exc:
            if dialect == "finetunes":
                raise AmbiguousRequestError(
                    operation.label,
                    exc.cause,
                    facts=(
                        f"the /finetunes dialect cannot list finetunes, so the one named "
                        f"{name!r} (rank {rank}) asked for at {started.isoformat()} cannot be "
                        "looked up: delete it by its id if it appears"
                    ),
                ) from exc
            found = yield from self._plan_lookup(
                exc,
                self._plan_find_created(name, rank, started),
                f"looking for the adapter named {name!r}",
            )
            if len(found) != 1:
                raise AmbiguousRequestError(
                    operation.label,
                    exc.cause,
                    facts=(
                        f"{len(found)} adapters named {name!r} with rank {rank} were created "
                        f"after {started.isoformat()}"
                        + (f": {', '.join(a.adapter_id for a in found)}" if found else "")
                    ),
                ) from exc
            logger.warning(
                "%s had an unknown outcome; it had created adapter %s, which is used",
                operation.label,
                found[0].adapter_id,
            )
            return found[0]

    def _plan_lookup(self, ambiguous: AmbiguousRequestError, lookup: Plan[T], what: str) -> Plan[T]:
        """Run a lookup that resolves an unknown outcome; its failure keeps it unknown."""
        try:
            return (yield from lookup)
        except TuningAPIError as failure:
            raise AmbiguousRequestError(
                ambiguous.operation,
                ambiguous.cause,
                facts=f"{what} failed too ({failure.message})",
            ) from ambiguous

    def _plan_find_created(self, name: str, rank: int, started: datetime) -> Plan[list[Adapter]]:
        found: list[Adapter] = []
        cursor = None
        while True:
            page = yield ops.list_adapters(100, cursor)
            found += [
                adapter
                for adapter in page.items
                if adapter.name == name
                and adapter.rank == rank
                and adapter.created_after(started - CLOCK_SLACK)
            ]
            if not page.next_cursor:
                return found
            cursor = page.next_cursor

    def _plan_list_adapters(self, limit: int, cursor: str | None) -> Plan[AdapterPage]:
        if self.dialect == "finetunes":
            raise UnsupportedFeatureError("listing adapters", "finetunes")
        try:
            page = yield ops.list_adapters(limit, cursor)
        except TuningAPIError as exc:
            if self.dialect is None and exc.status_code in MISSING_ROUTE_STATUSES:
                raise UnsupportedFeatureError(
                    "listing adapters (GET /adapters answered "
                    f"{exc.status_code}: only /adapters can list)",
                    "finetunes",
                ) from exc
            raise
        self._decide("adapters")
        return page

    def _plan_delete_adapter(self, adapter_id: str) -> Plan[None]:
        dialect = yield from self._plan_dialect_for(adapter_id)
        yield ops.delete_adapter(adapter_id, dialect=dialect)

    def _plan_save(self, adapter_id: str) -> Plan[Checkpoint]:
        """Save a checkpoint; an unknown outcome is resolved by listing checkpoints."""
        dialect = yield from self._plan_dialect_for(adapter_id)
        operation = ops.save_checkpoint(adapter_id, dialect=dialect)
        started = datetime.now(timezone.utc)
        try:
            return (yield operation)
        except AmbiguousRequestError as exc:
            found = yield from self._plan_lookup(
                exc,
                self._plan_checkpoints_after(adapter_id, dialect, started),
                f"listing the checkpoints of {adapter_id}",
            )
            if not found:
                raise AmbiguousRequestError(
                    operation.label,
                    exc.cause,
                    facts=f"no checkpoint of {adapter_id} was created after {started.isoformat()}",
                ) from exc
            newest = found[-1]
            logger.warning(
                "%s had an unknown outcome; it had saved checkpoint %s, which is returned",
                operation.label,
                newest.ref,
            )
            return newest

    def _plan_checkpoints_after(
        self, adapter_id: str, dialect: Dialect, started: datetime
    ) -> Plan[list[Checkpoint]]:
        found: list[Checkpoint] = []
        cursor = None
        while True:
            page = yield ops.list_checkpoints(adapter_id, 100, cursor, dialect=dialect)
            found += [item for item in page.items if item.created_after(started - CLOCK_SLACK)]
            if not page.next_cursor:
                break
            cursor = page.next_cursor
        return sorted(
            found, key=lambda item: (item.step or 0, str(item.created_at_ms or item.created_at))
        )

    def _plan_list_checkpoints(
        self, adapter_id: str, limit: int, cursor: str | None
    ) -> Plan[CheckpointPage]:
        dialect = yield from self._plan_dialect_for(adapter_id)
        return (yield ops.list_checkpoints(adapter_id, limit, cursor, dialect=dialect))

    def _plan_rollouts(
        self,
        adapter_id: str,
        request: AnyRequest | Mapping[str, Any],
        num_rollouts: int,
        ground_truth: GroundTruth | Mapping[str, Any] | None,
    ) -> Plan[RolloutsResponse]:
        call = RolloutCall(adapter_id, request, num_rollouts, ground_truth)
        call.operation()  # invalid input fails before anything is sent, detection included
        dialect = yield from self._plan_dialect_for(adapter_id)
        return (yield call.operation(dialect))

    def _plan_operations(self, calls: Iterable[RolloutCall]) -> Plan[list[ops.Operation[Any]]]:
        calls = list(calls)
        for call in calls:
            call.operation()
        dialects = {}
        for call in calls:
            if call.adapter_id not in dialects:
                dialects[call.adapter_id] = yield from self._plan_dialect_for(call.adapter_id)
        return [call.operation(dialects[call.adapter_id]) for call in calls]

    def _plan_train_step(
        self,
        adapter_id: str,
        groups: Sequence[Mapping[str, Any]],
        lr: float | None,
        extra: Mapping[str, Any],
    ) -> Plan[TrainStepResult]:
        ops.train_step(adapter_id, groups, lr=lr, extra=extra, dialect="finetunes")
        dialect = yield from self._plan_dialect_for(adapter_id)
        return (yield ops.train_step(adapter_id, groups, lr=lr, extra=extra, dialect=dialect))

    def _plan_log_metrics(
        self, adapter_id: str, step: int, metrics: Mapping[str, float]
    ) -> Plan[int]:
        ops.log_metrics(adapter_id, step, metrics)
        dialect = yield from self._plan_dialect_for(adapter_id)
        return (yield ops.log_metrics(adapter_id, step, metrics, dialect=dialect))

    def _plan_read_metrics(self, adapter_id: str) -> Plan[list[dict[str, Any]]]:
        dialect = yield from self._plan_dialect_for(adapter_id)
        return (yield ops.read_metrics(adapter_id, dialect=dialect))

    @classmethod
    def _local(cls, http_client: HttpClientT, dialect: DialectChoice = "auto") -> Self:
        client = cls(  # type: ignore[call-arg]
            api_key=LOCAL_API_KEY,
            base_url=LOCAL_BASE_URL,
            http_client=http_client,
            dialect=dialect,
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
    """``client.adapters``: create, read, list and delete adapters (finetunes)."""

    def __init__(self, client: TuningClient) -> None:
        self._client = client

    def create(self, name: str, rank: int, from_checkpoint: str | None = None) -> Adapter:
        """Create an adapter, optionally starting from a checkpoint ``adapter_id/chk_id``.

        An unknown outcome (timeout, dropped connection, 5xx) is resolved by listing
        adapters (``/adapters`` dialect): the one created is returned, never a second.

        Raises:
            AmbiguousRequestError: If the outcome stays unknown (always on ``/finetunes``,
                which has no list), with the name, rank and time asked.
            UnsupportedFeatureError: ``from_checkpoint`` on ``/finetunes``.
        """
        return self._client._drive(self._client._plan_create(name, rank, from_checkpoint))

    def get(self, adapter_id: str) -> Adapter:
        """Describe one adapter; in ``auto`` this is how the dialect is found."""
        return self._client._drive(self._client._plan_attach(adapter_id))

    def list(self, limit: int = 20, cursor: str | None = None) -> AdapterPage:
        """One page of adapters, with the cursor of the next page (``/adapters`` only)."""
        return self._client._drive(self._client._plan_list_adapters(limit, cursor))

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
        self._client._drive(self._client._plan_delete_adapter(adapter_id))


class Checkpoints:
    """``client.checkpoints``: save, list and delete checkpoints of an adapter."""

    def __init__(self, client: TuningClient) -> None:
        self._client = client

    def save(self, adapter_id: str) -> Checkpoint:
        """Save the adapter's current state as a checkpoint.

        An unknown outcome is resolved by listing checkpoints: the newest made since the
        request started is returned, so exactly one checkpoint is tracked per save.

        Raises:
            AmbiguousRequestError: If no checkpoint made since then is found.
        """
        return self._client._drive(self._client._plan_save(adapter_id))

    def list(self, adapter_id: str, limit: int = 20, cursor: str | None = None) -> CheckpointPage:
        """One page of an adapter's checkpoints."""
        return self._client._drive(self._client._plan_list_checkpoints(adapter_id, limit, cursor))

    def iter(self, adapter_id: str, limit: int = 20) -> Iterator[Checkpoint]:
        """Every checkpoint of an adapter, across pages."""
        cursor = None
        while True:
            page = self.list(adapter_id, limit=limit, cursor=cursor)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def delete(self, ref: str) -> None:
        """Delete a checkpoint by its ``ref``: ``adapter_id/chk_id`` or ``finetune_id@step``."""
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
        return self._client._drive(self._client._plan_log_metrics(adapter_id, step, metrics))

    def read(self, adapter_id: str) -> list[dict[str, Any]]:
        """Every logged metric ``{step, name, value, logged_at_ms}`` (local service only)."""
        return self._client._drive(self._client._plan_read_metrics(adapter_id))


class TuningClient(_ClientCore[httpx.Client]):
    """Synchronous client of the Moondream tuning API.

    Args:
        api_key: The API key; defaults to ``MOONDREAM_API_KEY``. Never logged or shown.
        base_url: Defaults to ``MOONDREAM_TUNING_URL`` or the Moondream Cloud URL.
        timeout: Seconds (or an ``httpx.Timeout``) for every request; by default connect
            10 s, read 120 s, and 900 s for train steps.
        max_retries: Retries of a failed request where retrying is safe.
        http_client: An ``httpx.Client`` to send through (not closed by ``close``).
        dialect: ``"adapters"`` (the spec), ``"finetunes"`` (the Moondream SDK's wire) or
            ``"auto"``: found by the first call, with read-only requests or a creation
            that a missing route refuses (``client.dialect`` then says which).

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
        dialect: DialectChoice = "auto",
    ) -> None:
        super().__init__(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            http_client=http_client,
            default_http_client=spread_client,
            dialect=dialect,
        )
        self._sleep: Callable[[float], None] = time.sleep
        self.adapters = Adapters(self)
        self.checkpoints = Checkpoints(self)
        self.metrics = Metrics(self)

    @classmethod
    def local(
        cls,
        *,
        data_dir: str | Path | None = None,
        dialect: DialectChoice = "auto",
        **service_options: Any,
    ) -> TuningClient:
        """A client of the local tuning service running in this process (no port).

        Args:
            data_dir: Where the service keeps adapters; a temporary folder by default.
            dialect: The wire dialect to speak (the service answers both).
            **service_options: Passed to ``lightning_moondream.server.create_app``.

        Raises:
            ValueError: For an unknown dialect name, before the service is made.
        """
        check_dialect(dialect)
        app, close = _local_app(data_dir, service_options)
        transport = InProcessTransport(app, on_close=close)
        return cls._local(httpx.Client(transport=transport), dialect)

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

    def _drive(self, plan: Plan[T]) -> T:
        try:
            operation = next(plan)
            while True:
                try:
                    result = self._execute(operation)
                except TuningAPIError as exc:
                    operation = plan.throw(exc)
                else:
                    operation = plan.send(result)
        except StopIteration as stop:
            return stop.value

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
        return self._drive(self._plan_rollouts(adapter_id, request, num_rollouts, ground_truth))

    def rollouts_many(
        self, calls: Iterable[RolloutCall], *, max_concurrency: int = 8
    ) -> list[RolloutsResponse]:
        """Run many rollouts requests at once, at most ``max_concurrency`` in flight.

        Every call is validated before any is sent. Results come in input order; the
        first failure cancels the calls not yet started and is raised.
        """
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        operations = self._drive(self._plan_operations(calls))
        with ThreadPoolExecutor(max_workers=max_concurrency) as pool:
            futures = [pool.submit(self._execute, operation) for operation in operations]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def train_step(
        self,
        adapter_id: str,
        groups: Sequence[Mapping[str, Any]],
        *,
        lr: float | None = None,
        **extra: Any,
    ) -> TrainStepResult:
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
        return self._drive(self._plan_train_step(adapter_id, groups, lr, extra))

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
    """``client.adapters`` of the async client; see ``Adapters``."""

    def __init__(self, client: AsyncTuningClient) -> None:
        self._client = client

    async def create(self, name: str, rank: int, from_checkpoint: str | None = None) -> Adapter:
        """Create an adapter; see ``Adapters.create``."""
        return await self._client._drive(self._client._plan_create(name, rank, from_checkpoint))

    async def get(self, adapter_id: str) -> Adapter:
        """Describe one adapter; in ``auto`` this is how the dialect is found."""
        return await self._client._drive(self._client._plan_attach(adapter_id))

    async def list(self, limit: int = 20, cursor: str | None = None) -> AdapterPage:
        """One page of adapters, with the cursor of the next page (``/adapters`` only)."""
        return await self._client._drive(self._client._plan_list_adapters(limit, cursor))

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
        await self._client._drive(self._client._plan_delete_adapter(adapter_id))


class AsyncCheckpoints:
    """``client.checkpoints`` of the async client; see ``Checkpoints``."""

    def __init__(self, client: AsyncTuningClient) -> None:
        self._client = client

    async def save(self, adapter_id: str) -> Checkpoint:
        """Save the adapter's current state as a checkpoint; see ``Checkpoints.save``."""
        return await self._client._drive(self._client._plan_save(adapter_id))

    async def list(
        self, adapter_id: str, limit: int = 20, cursor: str | None = None
    ) -> CheckpointPage:
        """One page of an adapter's checkpoints."""
        return await self._client._drive(
            self._client._plan_list_checkpoints(adapter_id, limit, cursor)
        )

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

    async def delete(self, ref: str) -> None:
        """Delete a checkpoint by its ``ref``: ``adapter_id/chk_id`` or ``finetune_id@step``."""
        await self._client._execute(ops.delete_checkpoint(ref))


class AsyncMetrics:
    """``client.metrics`` of the async client; see ``Metrics``."""

    def __init__(self, client: AsyncTuningClient) -> None:
        self._client = client

    async def log(self, adapter_id: str, step: int, metrics: Mapping[str, float]) -> int:
        """Log named finite values for a step; see ``Metrics.log``."""
        return await self._client._drive(self._client._plan_log_metrics(adapter_id, step, metrics))

    async def read(self, adapter_id: str) -> list[dict[str, Any]]:
        """Every logged metric (local service only)."""
        return await self._client._drive(self._client._plan_read_metrics(adapter_id))


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
        dialect: DialectChoice = "auto",
    ) -> None:
        super().__init__(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            http_client=http_client,
            default_http_client=async_spread_client,
            dialect=dialect,
        )
        self._sleep: Callable[[float], Any] = asyncio.sleep
        self.adapters = AsyncAdapters(self)
        self.checkpoints = AsyncCheckpoints(self)
        self.metrics = AsyncMetrics(self)

    @classmethod
    def local(
        cls,
        *,
        data_dir: str | Path | None = None,
        dialect: DialectChoice = "auto",
        **service_options: Any,
    ) -> AsyncTuningClient:
        """An async client of the local tuning service running in this process.

        Args:
            data_dir: Where the service keeps adapters; a temporary folder by default.
            dialect: The wire dialect to speak (the service answers both).
            **service_options: Passed to ``lightning_moondream.server.create_app``.

        Raises:
            ValueError: For an unknown dialect name, before the service is made.
        """
        check_dialect(dialect)
        app, close = _local_app(data_dir, service_options)
        transport = InProcessAsyncTransport(app, on_close=close)
        return cls._local(httpx.AsyncClient(transport=transport), dialect)

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
        return await self._drive(
            self._plan_rollouts(adapter_id, request, num_rollouts, ground_truth)
        )

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
        operations = await self._drive(self._plan_operations(calls))
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
        return await self._drive(self._plan_train_step(adapter_id, groups, lr, extra))

    async def close(self) -> None:
        """Close the HTTP client if this client created it."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
