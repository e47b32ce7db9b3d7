"""``InferenceClient`` and ``AsyncInferenceClient``: Moondream's inference API over httpx.

``/query``, ``/detect``, ``/point`` and ``/caption`` answer with the base model or with
any saved finetune checkpoint (``model_id(finetune_id, step)``). The wire is the one the
official ``moondream`` SDK sends, streaming included. Errors, retries, timeouts and usage
counting are the tuning client's: these calls change nothing on the server, so every
retryable failure is retried, and ``Retry-After`` is honoured.

The local service answers the same API: ``InferenceClient.local()`` runs one in this
process, and ``InferenceClient.for_tuning(tuning_client)`` talks to the very service a
tuning client talks to (the same in-process app for a local one), so a run's tuning and
inference see the same finetunes and checkpoints.

Example:
    >>> from lightning_moondream.api.inference import InferenceClient
    >>> from lightning_moondream.api.inference_models import model_id
    >>> with InferenceClient(model=model_id("01jq0v3b", 40)) as client:
    ...     boxes = client.detect("street.jpg", "car").objects
    ...     for text in client.caption_stream("street.jpg", length="short"):
    ...         print(text, end="")
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx
from pydantic import SecretStr

from lightning_moondream.api import wire
from lightning_moondream.api.async_client import AsyncTuningClient
from lightning_moondream.api.core import (
    CONNECT_TIMEOUT,
    LOCAL_API_KEY,
    LOCAL_BASE_URL,
    MIN_SCRUBBED_KEY,
    USER_AGENT,
    HttpClientT,
    local_app,
    resolve_api_key,
    server_message,
)
from lightning_moondream.api.errors import (
    APIConnectionError,
    APITimeoutError,
    InvalidRequestError,
    RateLimitError,
    ServerError,
    TuningAPIError,
    error_class_for_status,
)
from lightning_moondream.api.inference_models import (
    CaptionCall,
    CaptionLength,
    CaptionResult,
    DetectCall,
    DetectResult,
    InferenceCall,
    PointCall,
    PointResult,
    QueryCall,
    QueryResult,
    check_model,
)
from lightning_moondream.api.inprocess import InProcessAsyncTransport, InProcessTransport
from lightning_moondream.api.models import Settings
from lightning_moondream.api.operations import DEFAULT_READ_TIMEOUT, Action, Operation
from lightning_moondream.api.pools import async_spread_client, spread_client
from lightning_moondream.api.retry import (
    CallKind,
    RetryPolicy,
    parse_retry_after,
    should_retry_status,
    should_retry_transport,
)
from lightning_moondream.api.sync_client import TuningClient
from lightning_moondream.api.usage import UsageStats
from lightning_moondream.images import ImageInput

if TYPE_CHECKING:
    from typing_extensions import Self

R = TypeVar("R")
SettingsInput = Settings | Mapping[str, Any] | None
SpatialRefs = Sequence[Sequence[float]] | None

DEFAULT_INFERENCE_URL = "https://api.moondream.ai/v1"
TUNING_PATH = "/tuning"
"""What the tuning API's base URL adds to the inference API's (``.../v1/tuning``)."""


def resolve_inference_url(base_url: str | None = None, tuning_url: str | None = None) -> str:
    """Return the inference API's base URL.

    In order: ``base_url``; ``MOONDREAM_INFERENCE_URL``; the tuning API's base URL
    (``tuning_url``, else ``MOONDREAM_TUNING_URL``) without its ``/tuning``;
    Moondream Cloud's ``https://api.moondream.ai/v1``.

    Raises:
        ValueError: If the inference URL must come from a tuning URL that does not end
            in ``/tuning``.
    """
    explicit = base_url or os.environ.get("MOONDREAM_INFERENCE_URL")
    if explicit:
        return explicit.rstrip("/")
    source = "tuning_url" if tuning_url else "MOONDREAM_TUNING_URL"
    tuning = (tuning_url or os.environ.get("MOONDREAM_TUNING_URL") or "").rstrip("/")
    if not tuning:
        return DEFAULT_INFERENCE_URL
    if not tuning.endswith(TUNING_PATH):
        raise ValueError(
            f"the inference URL cannot be derived from {source} {tuning!r}, which does not end "
            f"in {TUNING_PATH!r}: pass base_url=... or set MOONDREAM_INFERENCE_URL"
        )
    return tuning.removesuffix(TUNING_PATH)


LOCAL_INFERENCE_URL = LOCAL_BASE_URL.removesuffix(TUNING_PATH)
"""Base URL of the in-process local service's inference API."""


class _EventReader:
    """The text chunks of a streamed answer: server-sent events ``data: {"chunk": ...}``.

    An event's data may span several ``data:`` lines (joined by newlines, as in the SSE
    standard), and events may or may not be separated by blank lines (the official SDK
    reads one JSON object per line): data is dispatched as soon as it parses.
    """

    def __init__(self, fail: Callable[[str], TuningAPIError]) -> None:
        self._fail = fail
        self._data: list[str] = []
        self.completed = False
        """Whether the event marked ``"completed": true`` has arrived."""

    def feed(self, line: str) -> list[str]:
        """Read one line of the stream; return the text it completes, if any."""
        if not line:
            if self._data:
                raise self._fail(f"sent an event that is not JSON: {self._pending()[:200]!r}")
            return []
        field, _, value = line.partition(":")
        if field != "data":
            return []  # comments (keep-alives), event names, ids, retry hints
        self._data.append(value.removeprefix(" "))
        try:
            event = json.loads(self._pending())
        except ValueError:
            return []
        self._data.clear()
        return self._dispatch(event)

    def _pending(self) -> str:
        return "\n".join(self._data)

    def _dispatch(self, event: Any) -> list[str]:
        if not isinstance(event, dict):
            raise self._fail(f"sent an event that is not a JSON object: {event!r}")
        if event.get("error"):
            error = event["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise self._fail(f"reported an error mid-stream: {message}")
        self.completed = bool(event.get("completed"))
        chunk = event.get("chunk")
        return [chunk] if isinstance(chunk, str) and chunk else []


def _sharing(tuning: TuningClient | AsyncTuningClient) -> dict[str, Any]:
    """The options of an inference client of the service a tuning client talks to."""
    return {
        "api_key": tuning._api_key,
        "tuning_url": tuning.base_url,
        "timeout": tuning.timeout,
        "max_retries": tuning.retry_policy.max_retries,
    }


class _InferenceCore(Generic[HttpClientT]):
    """What both clients share: configuration, building requests, reading answers."""

    _http: HttpClientT

    def __init__(
        self,
        *,
        api_key: str | SecretStr | None,
        base_url: str | None,
        tuning_url: str | None,
        model: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        http_client: HttpClientT | None,
        default_http_client: Callable[[], HttpClientT],
    ) -> None:
        self._api_key = resolve_api_key(api_key)
        self.base_url = resolve_inference_url(base_url, tuning_url)
        self.model = check_model(model)
        """The model of calls that name none; ``None`` lets the server answer with its base."""
        self.timeout = timeout
        self.retry_policy = RetryPolicy(max_retries=max_retries)
        self.usage = UsageStats()
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else default_http_client()

    @classmethod
    def _owning(cls, http_client: HttpClientT, **options: Any) -> Self:
        """A client that closes ``http_client`` (and the app behind it) when it closes."""
        client = cls(http_client=http_client, **options)
        client._owns_http = True
        return client

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, "
            "api_key='**********')"
        )

    def _operation(self, call: InferenceCall[R], *, stream: bool = False) -> Operation[R]:
        """Validate a call and build its request; nothing invalid is ever sent."""
        body = call.to_json()
        if call.streams:
            body["stream"] = stream
        if "model" not in body and self.model is not None:
            body["model"] = self.model
        return Operation(
            Action.INFERENCE,
            "POST",
            call.path,
            f"POST {call.path}",
            CallKind.SAFE,
            call.parse,
            json=body,
            images=int("image_url" in body),
        )

    def _operations(self, calls: Iterable[InferenceCall[R]]) -> list[Operation[R]]:
        operations = []
        for index, call in enumerate(calls):
            try:
                operations.append(self._operation(call))
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"calls[{index}]: {exc.message}") from exc
        return operations

    def _timeout(self) -> httpx.Timeout:
        if isinstance(self.timeout, httpx.Timeout):
            return self.timeout
        if self.timeout is not None:
            return httpx.Timeout(self.timeout)
        read = DEFAULT_READ_TIMEOUT
        return httpx.Timeout(connect=CONNECT_TIMEOUT, read=read, write=read, pool=read)

    def _build_request(self, operation: Operation[Any]) -> httpx.Request:
        streams = bool(operation.json.get("stream"))
        headers = {
            "X-Moondream-Auth": self._api_key.get_secret_value(),
            "User-Agent": USER_AGENT,
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if streams else "application/json",
        }
        return self._http.build_request(
            "POST",
            self.base_url + operation.path,
            content=wire.dumps(operation.json),
            headers=headers,
            timeout=self._timeout(),
        )

    def _label(self, operation: Operation[Any]) -> str:
        model = operation.json.get("model")
        return f"{operation.label} with model {model}" if model else operation.label

    def _scrub(self, text: str) -> str:
        key = self._api_key.get_secret_value()
        return text.replace(key, "**********") if len(key) >= MIN_SCRUBBED_KEY else text

    def _error(
        self, operation: Operation[Any], outcome: httpx.Response | Exception
    ) -> TuningAPIError:
        """The typed error of a failed attempt, its text scrubbed of the key."""
        label = self._label(operation)
        if isinstance(outcome, httpx.Response):
            request_id = outcome.headers.get("x-request-id") or outcome.headers.get("request-id")
            text = self._scrub(f"{label} answered {outcome.status_code}: {server_message(outcome)}")
            error_class = error_class_for_status(outcome.status_code)
            if error_class is RateLimitError:
                return RateLimitError(
                    text,
                    status_code=outcome.status_code,
                    request_id=request_id,
                    retry_after=parse_retry_after(outcome.headers.get("retry-after")),
                )
            return error_class(text, status_code=outcome.status_code, request_id=request_id)
        timed_out = isinstance(outcome, httpx.TimeoutException)
        text = self._scrub(
            f"{label} {'timed out' if timed_out else 'failed'}: {type(outcome).__name__}: {outcome}"
        )
        if timed_out:
            return APITimeoutError(text)
        if isinstance(outcome, httpx.TransportError):
            return APIConnectionError(text)
        return ServerError(text)  # an answer came but could not be read

    def _retry_delay(
        self, operation: Operation[Any], attempt: int, outcome: httpx.Response | httpx.RequestError
    ) -> float:
        """Seconds to wait before retrying a failed attempt.

        Raises:
            TuningAPIError: The typed error, when the call fails for good.
        """
        if isinstance(outcome, httpx.Response):
            retryable = should_retry_status(CallKind.SAFE, outcome.status_code)
            retry_after = parse_retry_after(outcome.headers.get("retry-after"))
        else:
            retryable = should_retry_transport(CallKind.SAFE, outcome)
            retry_after = None
        if retryable and attempt < self.retry_policy.max_retries:
            self.usage.record_retry()
            return self.retry_policy.delay(attempt, retry_after)
        self.usage.record_failure()
        raise self._error(operation, outcome)

    def _result(self, operation: Operation[R], response: httpx.Response) -> R:
        try:
            result = operation.parse(wire.loads(response.content))
        except (ValueError, TypeError) as exc:
            self.usage.record_failure()
            raise ServerError(
                self._scrub(
                    f"{self._label(operation)} answered something that is not the API's JSON: {exc}"
                ),
                status_code=response.status_code,
            ) from exc
        self.usage.record_success(images=operation.images)
        return result

    def _event_reader(self, operation: Operation[Any], response: httpx.Response) -> _EventReader:
        def fail(what: str) -> TuningAPIError:
            return ServerError(
                self._scrub(f"{self._label(operation)} {what}"), status_code=response.status_code
            )

        return _EventReader(fail)

    def _stream_ended(self, operation: Operation[Any], reader: _EventReader) -> None:
        """Count a stream that ended; one that ended before completing is an error."""
        if reader.completed:
            self.usage.record_success(images=operation.images)
            return
        self.usage.record_failure()
        raise APIConnectionError(
            f"{self._label(operation)}: the stream ended before its completed event, so the "
            "text is incomplete"
        )

    def _stream_broke(self, operation: Operation[Any], error: Exception) -> TuningAPIError:
        """The error of a stream that failed after its text began.

        It is never retried: the text already given would be given again.
        """
        self.usage.record_failure()
        return error if isinstance(error, TuningAPIError) else self._error(operation, error)


class InferenceClient(_InferenceCore[httpx.Client]):
    """Synchronous client of Moondream's inference API.

    Args:
        api_key: The API key; defaults to ``MOONDREAM_API_KEY``. Never logged or shown.
        base_url: Defaults to ``MOONDREAM_INFERENCE_URL``, else the tuning URL without
            ``/tuning``, else ``https://api.moondream.ai/v1``.
        tuning_url: The tuning API's base URL to derive the inference URL from; defaults
            to ``MOONDREAM_TUNING_URL``.
        model: The model of calls that name none: ``moondream3-preview`` or a checkpoint
            ``moondream3-preview/FT@STEP``; ``None`` sends none (the server's base model).
        timeout: Seconds (or an ``httpx.Timeout``) for every request; by default connect
            10 s, read 120 s (between streamed chunks, for a stream).
        max_retries: Retries of a failed request (connection errors, timeouts, 408, 425,
            429, 500, 502-504), after the wait ``Retry-After`` asks for, else backoff.
        http_client: An ``httpx.Client`` to send through (not closed by ``close``).

    Raises:
        MissingAPIKeyError: If no API key is given or set.
        InvalidRequestError: If ``model`` is malformed.
        ValueError: If the base URL cannot be derived from the tuning URL.
    """

    def __init__(
        self,
        *,
        api_key: str | SecretStr | None = None,
        base_url: str | None = None,
        tuning_url: str | None = None,
        model: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = 4,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(
            api_key=api_key,
            base_url=base_url,
            tuning_url=tuning_url,
            model=model,
            timeout=timeout,
            max_retries=max_retries,
            http_client=http_client,
            default_http_client=spread_client,
        )
        self._sleep: Callable[[float], None] = time.sleep

    @classmethod
    def local(
        cls,
        *,
        data_dir: str | Path | None = None,
        model: str | None = None,
        **service_options: Any,
    ) -> InferenceClient:
        """A client of the local service running in this process (no port).

        The service is made for this client and closed with it; to share one with a
        tuning client, use ``for_tuning`` on ``TuningClient.local()``.

        Args:
            data_dir: Where the service keeps finetunes; a temporary folder by default.
            model: The model of calls that name none (see ``InferenceClient``).
            **service_options: Passed to ``lightning_moondream.server.create_app``.
        """
        app, close = local_app(data_dir, service_options)
        http = httpx.Client(transport=InProcessTransport(app, on_close=close))
        return cls._owning(http, api_key=LOCAL_API_KEY, base_url=LOCAL_INFERENCE_URL, model=model)

    @classmethod
    def for_tuning(cls, tuning: TuningClient, *, model: str | None = None) -> InferenceClient:
        """A client of the service ``tuning`` talks to, with its key, timeout and retries.

        It sends through the tuning client's HTTP client, so for ``TuningClient.local()``
        it reaches the same in-process service; it is usable while ``tuning`` is open,
        and closing it leaves ``tuning`` open. The base URL is the tuning URL without
        ``/tuning``.

        Args:
            tuning: The tuning client.
            model: The model of calls that name none (see ``InferenceClient``).
        """
        return cls(**_sharing(tuning), model=model, http_client=tuning._http)

    def _send(self, operation: Operation[R]) -> R:
        request = self._build_request(operation)
        attempt = 0
        while True:
            started = time.perf_counter()
            outcome: httpx.Response | httpx.RequestError
            try:
                outcome = self._http.send(request)
            except httpx.RequestError as exc:
                outcome = exc
            elapsed = time.perf_counter() - started
            self.usage.record_attempt(operation.endpoint, elapsed, len(request.content))
            if isinstance(outcome, httpx.Response) and outcome.is_success:
                return self._result(operation, outcome)
            self._sleep(self._retry_delay(operation, attempt, outcome))
            attempt += 1

    def _open_stream(
        self, request: httpx.Request, operation: Operation[Any]
    ) -> tuple[httpx.Response, float]:
        """Send until an answer begins with a success status, retrying as ``_send``.

        Returns:
            The answer, its body still to read, and when its attempt started.
        """
        attempt = 0
        while True:
            started = time.perf_counter()
            outcome: httpx.Response | httpx.RequestError
            try:
                outcome = self._http.send(request, stream=True)
                if outcome.is_success:
                    return outcome, started
                try:
                    outcome.read()
                finally:
                    outcome.close()
            except httpx.RequestError as exc:
                outcome = exc
            elapsed = time.perf_counter() - started
            self.usage.record_attempt(operation.endpoint, elapsed, len(request.content))
            self._sleep(self._retry_delay(operation, attempt, outcome))
            attempt += 1

    def _stream(self, operation: Operation[Any]) -> Generator[str, None, None]:
        request = self._build_request(operation)
        response, started = self._open_stream(request, operation)
        reader = self._event_reader(operation, response)
        try:
            for line in response.iter_lines():
                yield from reader.feed(line)
                if reader.completed:
                    break
        except (httpx.RequestError, TuningAPIError) as exc:
            raise self._stream_broke(operation, exc) from exc
        finally:
            response.close()
            elapsed = time.perf_counter() - started
            self.usage.record_attempt(operation.endpoint, elapsed, len(request.content))
        self._stream_ended(operation, reader)

    def query(
        self,
        image: ImageInput | None,
        question: str,
        *,
        model: str | None = None,
        settings: SettingsInput = None,
        reasoning: bool | None = None,
        spatial_refs: SpatialRefs = None,
    ) -> QueryResult:
        """Answer a question about an image (or none).

        Args:
            image: A PIL image, a path, encoded bytes or a data URL; ``None`` for text only.
            question: The question.
            model: The model id; defaults to the client's.
            settings: Sampling settings; only those set are sent.
            reasoning: Ask for the reasoning behind the answer.
            spatial_refs: Points ``[x, y]`` or boxes ``[x1, y1, x2, y2]`` (0-1).

        Raises:
            InvalidRequestError: Naming the argument that is wrong, before sending.
        """
        call = QueryCall(image, question, settings, reasoning, spatial_refs, model=model)
        return self._send(self._operation(call))

    def query_stream(
        self,
        image: ImageInput | None,
        question: str,
        *,
        model: str | None = None,
        settings: SettingsInput = None,
        reasoning: bool | None = None,
        spatial_refs: SpatialRefs = None,
    ) -> Generator[str, None, None]:
        """Answer a question as a stream of text chunks; arguments as ``query``.

        The call is validated here; it is sent when iteration starts. A failure before
        the text begins is retried as any call; one after it raises. Closing the
        generator early closes the connection.

        Raises:
            InvalidRequestError: Naming the argument that is wrong, before sending.
            APIConnectionError: While iterating, if the stream ends before completing.
        """
        call = QueryCall(image, question, settings, reasoning, spatial_refs, model=model)
        return self._stream(self._operation(call, stream=True))

    def detect(
        self,
        image: ImageInput,
        object: str,
        *,
        model: str | None = None,
        settings: SettingsInput = None,
    ) -> DetectResult:
        """Detect every instance of an object, as boxes.

        Args:
            image: A PIL image, a path, encoded bytes or a data URL.
            object: What to detect.
            model: The model id; defaults to the client's.
            settings: Sampling settings, ``max_objects`` included; only those set are sent.

        Raises:
            InvalidRequestError: Naming the argument that is wrong, before sending.
        """
        return self._send(self._operation(DetectCall(image, object, settings, model=model)))

    def point(
        self,
        image: ImageInput,
        object: str,
        *,
        model: str | None = None,
        settings: SettingsInput = None,
        spatial_refs: SpatialRefs = None,
    ) -> PointResult:
        """Point at every instance of an object; arguments as ``detect``, plus ``spatial_refs``.

        Raises:
            InvalidRequestError: Naming the argument that is wrong, before sending.
        """
        call = PointCall(image, object, settings, spatial_refs, model=model)
        return self._send(self._operation(call))

    def caption(
        self,
        image: ImageInput,
        *,
        length: CaptionLength = "normal",
        model: str | None = None,
        settings: SettingsInput = None,
    ) -> CaptionResult:
        """Describe an image.

        Args:
            image: A PIL image, a path, encoded bytes or a data URL.
            length: ``"short"``, ``"normal"`` or ``"long"``.
            model: The model id; defaults to the client's.
            settings: Sampling settings; only those set are sent.

        Raises:
            InvalidRequestError: Naming the argument that is wrong, before sending.
        """
        return self._send(self._operation(CaptionCall(image, length, settings, model=model)))

    def caption_stream(
        self,
        image: ImageInput,
        *,
        length: CaptionLength = "normal",
        model: str | None = None,
        settings: SettingsInput = None,
    ) -> Generator[str, None, None]:
        """Describe an image as a stream of text chunks; see ``caption`` and ``query_stream``."""
        call = CaptionCall(image, length, settings, model=model)
        return self._stream(self._operation(call, stream=True))

    def many(self, calls: Iterable[InferenceCall[R]], *, max_concurrency: int = 8) -> list[R]:
        """Run many calls at once, at most ``max_concurrency`` in flight.

        Every call is validated before any is sent. Results come in input order; the
        first failure cancels the calls not yet started and is raised.

        Raises:
            InvalidRequestError: Naming the call (``calls[i]``) and argument that is wrong.
        """
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        operations = self._operations(calls)
        with ThreadPoolExecutor(max_workers=max_concurrency) as pool:
            futures = [pool.submit(self._send, operation) for operation in operations]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def close(self) -> None:
        """Close the HTTP client if this client created it."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncInferenceClient(_InferenceCore[httpx.AsyncClient]):
    """Asynchronous client of Moondream's inference API; arguments as ``InferenceClient``."""

    def __init__(
        self,
        *,
        api_key: str | SecretStr | None = None,
        base_url: str | None = None,
        tuning_url: str | None = None,
        model: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = 4,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            api_key=api_key,
            base_url=base_url,
            tuning_url=tuning_url,
            model=model,
            timeout=timeout,
            max_retries=max_retries,
            http_client=http_client,
            default_http_client=async_spread_client,
        )
        self._sleep: Callable[[float], Any] = asyncio.sleep

    @classmethod
    def local(
        cls,
        *,
        data_dir: str | Path | None = None,
        model: str | None = None,
        **service_options: Any,
    ) -> AsyncInferenceClient:
        """An async client of the local service running in this process; see ``InferenceClient.local``."""
        app, close = local_app(data_dir, service_options)
        http = httpx.AsyncClient(transport=InProcessAsyncTransport(app, on_close=close))
        return cls._owning(http, api_key=LOCAL_API_KEY, base_url=LOCAL_INFERENCE_URL, model=model)

    @classmethod
    def for_tuning(
        cls, tuning: AsyncTuningClient, *, model: str | None = None
    ) -> AsyncInferenceClient:
        """An async client of the service ``tuning`` talks to; see ``InferenceClient.for_tuning``."""
        return cls(**_sharing(tuning), model=model, http_client=tuning._http)

    async def _send(self, operation: Operation[R]) -> R:
        request = self._build_request(operation)
        attempt = 0
        while True:
            started = time.perf_counter()
            outcome: httpx.Response | httpx.RequestError
            try:
                outcome = await self._http.send(request)
            except httpx.RequestError as exc:
                outcome = exc
            elapsed = time.perf_counter() - started
            self.usage.record_attempt(operation.endpoint, elapsed, len(request.content))
            if isinstance(outcome, httpx.Response) and outcome.is_success:
                return self._result(operation, outcome)
            await self._sleep(self._retry_delay(operation, attempt, outcome))
            attempt += 1

    async def _open_stream(
        self, request: httpx.Request, operation: Operation[Any]
    ) -> tuple[httpx.Response, float]:
        attempt = 0
        while True:
            started = time.perf_counter()
            outcome: httpx.Response | httpx.RequestError
            try:
                outcome = await self._http.send(request, stream=True)
                if outcome.is_success:
                    return outcome, started
                try:
                    await outcome.aread()
                finally:
                    await outcome.aclose()
            except httpx.RequestError as exc:
                outcome = exc
            elapsed = time.perf_counter() - started
            self.usage.record_attempt(operation.endpoint, elapsed, len(request.content))
            await self._sleep(self._retry_delay(operation, attempt, outcome))
            attempt += 1

    async def _stream(self, operation: Operation[Any]) -> AsyncGenerator[str, None]:
        request = self._build_request(operation)
        response, started = await self._open_stream(request, operation)
        reader = self._event_reader(operation, response)
        try:
            async for line in response.aiter_lines():
                for chunk in reader.feed(line):
                    yield chunk
                if reader.completed:
                    break
        except (httpx.RequestError, TuningAPIError) as exc:
            raise self._stream_broke(operation, exc) from exc
        finally:
            await response.aclose()
            elapsed = time.perf_counter() - started
            self.usage.record_attempt(operation.endpoint, elapsed, len(request.content))
        self._stream_ended(operation, reader)

    async def query(
        self,
        image: ImageInput | None,
        question: str,
        *,
        model: str | None = None,
        settings: SettingsInput = None,
        reasoning: bool | None = None,
        spatial_refs: SpatialRefs = None,
    ) -> QueryResult:
        """Answer a question about an image (or none); see ``InferenceClient.query``."""
        call = QueryCall(image, question, settings, reasoning, spatial_refs, model=model)
        return await self._send(self._operation(call))

    def query_stream(
        self,
        image: ImageInput | None,
        question: str,
        *,
        model: str | None = None,
        settings: SettingsInput = None,
        reasoning: bool | None = None,
        spatial_refs: SpatialRefs = None,
    ) -> AsyncGenerator[str, None]:
        """Answer as an async stream of text chunks; see ``InferenceClient.query_stream``.

        Raises:
            InvalidRequestError: Naming the argument that is wrong, before sending.
        """
        call = QueryCall(image, question, settings, reasoning, spatial_refs, model=model)
        return self._stream(self._operation(call, stream=True))

    async def detect(
        self,
        image: ImageInput,
        object: str,
        *,
        model: str | None = None,
        settings: SettingsInput = None,
    ) -> DetectResult:
        """Detect every instance of an object; see ``InferenceClient.detect``."""
        return await self._send(self._operation(DetectCall(image, object, settings, model=model)))

    async def point(
        self,
        image: ImageInput,
        object: str,
        *,
        model: str | None = None,
        settings: SettingsInput = None,
        spatial_refs: SpatialRefs = None,
    ) -> PointResult:
        """Point at every instance of an object; see ``InferenceClient.point``."""
        call = PointCall(image, object, settings, spatial_refs, model=model)
        return await self._send(self._operation(call))

    async def caption(
        self,
        image: ImageInput,
        *,
        length: CaptionLength = "normal",
        model: str | None = None,
        settings: SettingsInput = None,
    ) -> CaptionResult:
        """Describe an image; see ``InferenceClient.caption``."""
        return await self._send(self._operation(CaptionCall(image, length, settings, model=model)))

    def caption_stream(
        self,
        image: ImageInput,
        *,
        length: CaptionLength = "normal",
        model: str | None = None,
        settings: SettingsInput = None,
    ) -> AsyncGenerator[str, None]:
        """Describe an image as an async stream of text chunks; see ``caption_stream``."""
        call = CaptionCall(image, length, settings, model=model)
        return self._stream(self._operation(call, stream=True))

    async def many(self, calls: Iterable[InferenceCall[R]], *, max_concurrency: int = 8) -> list[R]:
        """Run many calls at once, at most ``max_concurrency`` in flight.

        Every call is validated before any is sent. Results come in input order; the
        first failure cancels the others and is raised. From synchronous code, run it on
        a ``BackgroundLoop`` or with ``asyncio.run``.

        Raises:
            InvalidRequestError: Naming the call (``calls[i]``) and argument that is wrong.
        """
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        operations = self._operations(calls)
        limit = asyncio.Semaphore(max_concurrency)

        async def bounded(operation: Operation[R]) -> R:
            async with limit:
                return await self._send(operation)

        tasks = [asyncio.ensure_future(bounded(operation)) for operation in operations]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def close(self) -> None:
        """Close the HTTP client if this client created it."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
