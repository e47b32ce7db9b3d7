"""What both tuning clients share: configuration, requests, answers and errors.

``ClientCore`` holds a client's configuration (API key, base URL, timeouts, retry
policy, rate limiter, dialect) and turns an ``Operation`` into an ``httpx.Request``, and
an attempt's outcome into a result, a wait before the next attempt, or a typed error,
telling the rate limiter what the service answered. A call is written here as steps
(``drivers``): it never sends and never sleeps itself; the synchronous and asynchronous
clients' drivers do, each in its own way.
"""

from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx
from pydantic import SecretStr

from lightning_moondream.api import wire
from lightning_moondream.api.drivers import DrivenMethod, Outcome, Send, Steps
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
from lightning_moondream.api.limiter import RateLimiter, limiter_for
from lightning_moondream.api.limits import NO_RATE_LIMIT, RATE_LIMIT_HEADER
from lightning_moondream.api.models import RolloutsResponse
from lightning_moondream.api.operations import (
    Action,
    Dialect,
    GroundTruthInput,
    Operation,
    RequestInput,
)
from lightning_moondream.api.plans import (
    DialectChoice,
    DialectNegotiation,
    Plan,
    Plans,
    RolloutCall,
    check_dialect,
)
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
MAX_MESSAGE = 500
"""Characters of a server's error body kept in a message."""


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


@dataclass(frozen=True)
class Done(Generic[T]):
    """The result of an attempt that settled the call."""

    value: T


@dataclass
class Attempts:
    """What one call's attempts have cost so far.

    Attributes:
        retries: Retries after failures, counted against ``max_retries``.
        rate_limited: Retries after a 429, not counted against it.
        rate_limited_wait: Seconds waited on 429s, bounded by ``max_rate_limited_wait``.
    """

    retries: int = 0
    rate_limited: int = 0
    rate_limited_wait: float = 0.0


def retry_after_of(response: httpx.Response) -> float | None:
    """The seconds a response's ``Retry-After`` asks to wait, if it says."""
    return parse_retry_after(response.headers.get("retry-after"))


class HttpHolder(ABC, Generic[HttpClientT]):
    """The httpx client a client sends through, and whether closing it is the client's job.

    The client's driver (``drivers``) says which httpx client to make when none is given.
    """

    _http: HttpClientT
    _owns_http: bool
    _direct: Any = None
    """The transport of the httpx client this client made, which the driver sends
    through directly; ``None`` for a given client, sent through as given."""

    def _hold_http(self, http_client: HttpClientT | None) -> None:
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else self._default_http_client()

    def _new_request(
        self, method: str, url: str, timeout: httpx.Timeout, **parts: Any
    ) -> httpx.Request:
        """A request to send: made directly, or with a given httpx client's defaults."""
        if self._direct is None:
            return self._http.build_request(method, url, timeout=timeout, **parts)
        return httpx.Request(method, url, extensions={"timeout": timeout.as_dict()}, **parts)

    @abstractmethod
    def _default_http_client(self) -> HttpClientT:
        """The httpx client to send through when none is given (the driver's)."""

    @classmethod
    @abstractmethod
    def _in_process_http_client(cls, app: Any, on_close: Callable[[], None]) -> HttpClientT:
        """An httpx client whose transport calls ``app`` in this process (the driver's)."""

    @classmethod
    def _of_local_app(
        cls, data_dir: str | Path | None, service_options: dict[str, Any], **options: Any
    ) -> Self:
        """A client of a local service app made for it alone, closed with it."""
        app, close = local_app(data_dir, service_options)
        options["http_client"] = cls._in_process_http_client(app, close)
        client = cls(**options)
        client._owns_http = True
        return client


def _rollouts(
    adapter_id: str,
    request: RequestInput,
    num_rollouts: int,
    ground_truth: GroundTruthInput = None,
) -> RolloutCall:
    """Sample ``num_rollouts`` attempts at a request.

    Args:
        adapter_id: The adapter to sample from.
        request: A typed request or the spec's JSON.
        num_rollouts: 1 to 16.
        ground_truth: For point and detect (points or boxes for point): the server
            then computes rewards.
    """
    return RolloutCall(adapter_id, request, num_rollouts, ground_truth)


class ClientCore(HttpHolder[HttpClientT]):
    """Configuration, building requests and reading answers, for both clients.

    Its arguments are documented on ``TuningClient``, which both clients share. Methods
    written once for both (``rollouts``) are here too.
    """

    def __init__(
        self,
        *,
        api_key: str | SecretStr | None = None,
        base_url: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = 4,
        http_client: HttpClientT | None = None,
        dialect: DialectChoice = "auto",
        requests_per_second: float | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        check_dialect(dialect)
        self._api_key = resolve_api_key(api_key)
        self.base_url = resolve_base_url(base_url)
        self.timeout = timeout
        self.retry_policy = RetryPolicy(max_retries=max_retries)
        self.usage = UsageStats()
        self.rate_limiter = rate_limiter or limiter_for(
            self.base_url, self._api_key, requests_per_second
        )
        """The pace of this client's key, shared with every client of the key here."""
        self._plans = Plans(DialectNegotiation(dialect, self.base_url), self._scrub)
        self._hold_http(http_client)

    @classmethod
    def local(
        cls,
        *,
        data_dir: str | Path | None = None,
        dialect: DialectChoice = "auto",
        **service_options: Any,
    ) -> Self:
        """A client of the local tuning service running in this process (no port).

        Args:
            data_dir: Where the service keeps adapters; a temporary folder by default.
            dialect: The wire dialect to speak (the service answers both).
            **service_options: Passed to ``lightning_moondream.server.create_app``.

        Raises:
            ValueError: For an unknown dialect name, before the service is made.
        """
        check_dialect(dialect)
        return cls._of_local_app(
            data_dir,
            service_options,
            api_key=LOCAL_API_KEY,
            base_url=LOCAL_BASE_URL,
            dialect=dialect,
            # The app serves this client alone, so its rate is this client's alone too.
            rate_limiter=RateLimiter(),
        )

    @property
    def dialect(self) -> Dialect | None:
        """The dialect the service speaks: as given, decided, or ``None`` before deciding."""
        return self._plans.negotiation.dialect

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, dialect={self.dialect!r}, "
            "api_key='**********')"
        )

    # Requests ---------------------------------------------------------------------------

    def _build_request(self, operation: Operation[Any]) -> httpx.Request:
        headers = {
            "X-Moondream-Auth": self._api_key.get_secret_value(),
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        content = None
        if operation.json is not None:
            content = wire.dumps(operation.json)
            headers["Content-Type"] = "application/json"
        return self._new_request(
            operation.method,
            self.base_url + operation.path,
            request_timeout(self.timeout, operation),
            params=operation.params,
            content=content,
            headers=headers,
        )

    # Steps -------------------------------------------------------------------------------

    def _attempts(self, operation: Operation[T]) -> Steps[T]:
        """Send an operation, at the key's pace, until it settles; its result."""
        request = self._build_request(operation)
        attempts = Attempts()

        def settle(outcome: Outcome, sent_at: float, started: float) -> Done[T] | float:
            elapsed = time.perf_counter() - started
            size = len(request.content)
            return self._settle(operation, attempts, outcome, sent_at, elapsed, size)

        return (yield from paced_attempts(self.rate_limiter, Send(request), settle))

    def _steps(self, plan: Plan[T]) -> Steps[T]:
        """Send each operation a plan yields, handing it the result or the error."""
        try:
            operation = next(plan)
            while True:
                try:
                    result = yield from self._attempts(operation)
                except TuningAPIError as exc:
                    operation = plan.throw(exc)
                else:
                    operation = plan.send(result)
        except StopIteration as stop:
            return stop.value

    # Methods of both clients ------------------------------------------------------------

    def _rollouts_steps(self, call: RolloutCall) -> Steps[RolloutsResponse]:
        """The steps of one ``/rollouts`` call, its dialect found first if need be."""
        plan = self._plans.rollouts(
            call.adapter_id, call.request, call.num_rollouts, call.ground_truth
        )
        return (yield from self._steps(plan))

    rollouts = DrivenMethod(_rollouts, _rollouts_steps)

    # Answers and errors ------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return scrub_key(self._api_key, text)

    def _settle(
        self,
        operation: Operation[T],
        attempts: Attempts,
        outcome: Outcome,
        sent_at: float,
        elapsed: float,
        bytes_sent: int,
    ) -> Done[T] | float:
        """Decide what an attempt's outcome means.

        Args:
            operation: What was sent.
            attempts: What the call's attempts have cost so far; updated.
            outcome: The answer, or why none came.
            sent_at: When it was sent, on the rate limiter's clock.
            elapsed: Seconds from sending to the full answer.
            bytes_sent: Size of the body.

        Returns:
            ``Done`` with the result, or the seconds to wait before retrying.

        Raises:
            TuningAPIError: The typed error, when the call fails for good.
        """
        self.usage.record_attempt(operation.endpoint, elapsed, bytes_sent)
        if isinstance(outcome, httpx.Response):
            done = self._answered(operation, attempts, outcome, sent_at)
            if done is not None:
                return done
            error = status_error(operation.label, outcome, self._scrub)
            retryable = should_retry_status(operation.kind, outcome.status_code)
            # Only a 5xx leaves a state change in doubt; a 4xx is the server refusing.
            ambiguous = not retryable and outcome.status_code >= 500
        else:
            error = transport_error(operation.label, outcome, self._scrub)
            retryable = should_retry_transport(operation.kind, outcome)
            ambiguous = not retryable
        delay = self._retry_delay(attempts, outcome) if retryable else None
        if delay is not None:
            self.usage.record_retry()
            return delay
        self.usage.record_failure()
        if ambiguous and operation.kind is CallKind.STATE_CHANGING:
            raise AmbiguousRequestError(operation.label, error)
        raise error

    def _answered(
        self,
        operation: Operation[T],
        attempts: Attempts,
        response: httpx.Response,
        sent_at: float,
    ) -> Done[T] | None:
        """Tell the rate limiter about an answer; the result if it settles the call."""
        pace_answer(self.rate_limiter, self.usage, response, sent_at)
        if response.is_success:
            return Done(self._parse(operation, response))
        if response.status_code == 404 and (
            operation.absent_is_done or (attempts.retries > 0 and operation.method == "DELETE")
        ):
            # Already gone: idempotent, or deleted by an attempt whose answer was lost.
            return Done(operation.parse({}))
        return None

    def _retry_delay(
        self, attempts: Attempts, outcome: httpx.Response | httpx.RequestError
    ) -> float | None:
        """The wait before retrying a retryable failure, or ``None`` to give up."""
        return retry_delay(self.retry_policy, attempts, outcome)

    def _parse(self, operation: Operation[T], response: httpx.Response) -> T:
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
        self._count_success(operation, result)
        return result

    def _count_success(self, operation: Operation[Any], result: Any) -> None:
        if operation.action is Action.ROLLOUTS:
            self.usage.record_success(rollouts=len(result), images=operation.images)
        elif operation.action is Action.TRAIN_STEP:
            self.usage.record_success(train_steps=1)


def scrub_key(api_key: SecretStr, text: str) -> str:
    """A text with the API key replaced by stars."""
    key = api_key.get_secret_value()
    # A key too short to be a secret (the local service's "local") would only mangle
    # ordinary words of the message.
    return text.replace(key, "**********") if len(key) >= MIN_SCRUBBED_KEY else text


def status_error(
    label: str, response: httpx.Response, scrub: Callable[[str], str]
) -> TuningAPIError:
    """The typed error of an answer with a failure status, its text scrubbed of the key."""
    request_id = response.headers.get("x-request-id") or response.headers.get("request-id")
    message = server_message(response)
    text = scrub(f"{label} answered {response.status_code}: {message}")
    error_class = error_class_for_status(response.status_code)
    if error_class is RateLimitError:
        return RateLimitError(
            text,
            status_code=response.status_code,
            request_id=request_id,
            retry_after=retry_after_of(response),
        )
    return error_class(text, status_code=response.status_code, request_id=request_id)


def transport_error(label: str, error: Exception, scrub: Callable[[str], str]) -> TuningAPIError:
    """The typed error of a request that got no answer, its text scrubbed of the key."""
    what = "timed out" if isinstance(error, httpx.TimeoutException) else "failed"
    text = scrub(f"{label} {what}: {type(error).__name__}: {error}")
    if isinstance(error, httpx.TimeoutException):
        return APITimeoutError(text)
    if isinstance(error, httpx.TransportError):
        return APIConnectionError(text)
    # An answer came but could not be read (bad encoding, endless redirects).
    return ServerError(text)


def request_timeout(
    configured: float | httpx.Timeout | None, operation: Operation[Any]
) -> httpx.Timeout:
    """A request's timeouts: the client's, else the operation's own read timeout."""
    if isinstance(configured, httpx.Timeout):
        return configured
    if configured is not None:
        return httpx.Timeout(configured)
    read = operation.read_timeout
    return httpx.Timeout(connect=CONNECT_TIMEOUT, read=read, write=read, pool=read)


def paced_attempts(
    limiter: RateLimiter, send: Send, settle: Callable[[Outcome, float, float], Done[T] | float]
) -> Steps[T]:
    """Send a request on the key's turns until an attempt settles the call.

    Args:
        limiter: The key's rate limiter, which gives each attempt its turn.
        send: The request.
        settle: Told each attempt's outcome, when its turn started (on the limiter's
            clock) and when it was sent (``time.perf_counter``); returns ``Done`` with
            the call's result, or the seconds to wait before retrying, or raises the
            call's error.

    Returns:
        The call's result.
    """
    delay: float | None = None  # before a retry: the wait it asks for
    while True:
        turn = limiter.reserve(delay or 0.0)
        if delay is not None or turn.wait > 0:
            yield turn.wait
        # What the key learnt while this turn waited may move it later (``confirm``).
        while (turn := limiter.confirm(turn)).wait > 0:
            yield turn.wait
        started = time.perf_counter()
        outcome = yield send
        settled = settle(outcome, turn.at, started)
        if isinstance(settled, Done):
            return settled.value
        delay = settled


def pace_answer(
    limiter: RateLimiter, usage: UsageStats, response: httpx.Response, sent_at: float
) -> None:
    """Tell a key's rate limiter, and the usage, what an answer says of the pace."""
    if response.status_code == 429:
        usage.record_rate_limited()
        limiter.record_rate_limited(sent_at, retry_after_of(response))
    else:
        if response.headers.get(RATE_LIMIT_HEADER) == NO_RATE_LIMIT:
            limiter.record_unlimited()
        if response.status_code < 500:
            limiter.record_success()
        else:
            limiter.record_error()
    usage.record_admitted_rate(limiter.rate)


def retry_delay(
    policy: RetryPolicy, attempts: Attempts, outcome: httpx.Response | httpx.RequestError
) -> float | None:
    """The wait before retrying a retryable failure, or ``None`` to give up.

    A 429 is the service asking to slow down: it is waited out, not counted against
    ``max_retries``, up to ``max_rate_limited_wait`` seconds in all.
    """
    retry_after = retry_after_of(outcome) if isinstance(outcome, httpx.Response) else None
    if isinstance(outcome, httpx.Response) and outcome.status_code == 429:
        delay = policy.delay(attempts.rate_limited, retry_after)
        if attempts.rate_limited_wait + delay > policy.max_rate_limited_wait:
            return None
        attempts.rate_limited += 1
        attempts.rate_limited_wait += delay
        return delay
    if attempts.retries >= policy.max_retries:
        return None
    delay = policy.delay(attempts.retries, retry_after)
    attempts.retries += 1
    return delay


def local_app(
    data_dir: str | Path | None, service_options: dict[str, Any]
) -> tuple[Any, Callable[[], None]]:
    """A local service app made for one client, and how to release it with the client."""
    from lightning_moondream.server import close_app, create_app

    app = create_app(data_dir=data_dir, **service_options)
    return app, lambda: close_app(app)


def server_message(response: httpx.Response) -> str:
    """The server's own words about an error, from the API's JSON or the body text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:MAX_MESSAGE] or response.reason_phrase
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
    return json.dumps(body)[:MAX_MESSAGE]
