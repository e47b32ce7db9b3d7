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

import json
import os
import time
from collections.abc import (
    AsyncGenerator,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

import httpx
from pydantic import SecretStr

from lightning_moondream.api import wire
from lightning_moondream.api.core import (
    LOCAL_API_KEY,
    LOCAL_BASE_URL,
    USER_AGENT,
    Attempts,
    ClientCore,
    Done,
    HttpClientT,
    HttpHolder,
    pace_answer,
    paced_attempts,
    request_timeout,
    resolve_api_key,
    retry_delay,
    scrub_key,
    status_error,
    transport_error,
)
from lightning_moondream.api.drivers import (
    AsyncDriver,
    BlockingDriver,
    ClientMethod,
    DrivenMethod,
    Outcome,
    Send,
    Steps,
    check_concurrency,
)
from lightning_moondream.api.errors import (
    APIConnectionError,
    InvalidRequestError,
    ServerError,
    TuningAPIError,
)
from lightning_moondream.api.inference_models import (
    CaptionCall,
    CaptionLength,
    DetectCall,
    InferenceCall,
    PointCall,
    QueryCall,
    check_model,
)
from lightning_moondream.api.limiter import RateLimiter, limiter_for
from lightning_moondream.api.models import Settings
from lightning_moondream.api.operations import Action, Operation
from lightning_moondream.api.retry import (
    CallKind,
    RetryPolicy,
    should_retry_status,
    should_retry_transport,
)
from lightning_moondream.api.usage import UsageStats
from lightning_moondream.images import ImageInput

if TYPE_CHECKING:
    from typing_extensions import Self

R = TypeVar("R")
P = ParamSpec("P")
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


# The calls, each written once ---------------------------------------------------------
#
# A call's arguments and documentation are those of the function that builds it
# (``_query``, ...); ``DrivenMethod`` and ``_StreamMethod`` make the clients' methods
# of it, once for both, so both take the same arguments and say the same of them.


def _query(
    image: ImageInput | None,
    question: str,
    *,
    model: str | None = None,
    settings: SettingsInput = None,
    reasoning: bool | None = None,
    spatial_refs: SpatialRefs = None,
) -> QueryCall:
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
    return QueryCall(image, question, settings, reasoning, spatial_refs, model=model)


def _detect(
    image: ImageInput,
    object: str,
    *,
    model: str | None = None,
    settings: SettingsInput = None,
) -> DetectCall:
    """Detect every instance of an object, as boxes.

    Args:
        image: A PIL image, a path, encoded bytes or a data URL.
        object: What to detect.
        model: The model id; defaults to the client's.
        settings: Sampling settings, ``max_objects`` included; only those set are sent.

    Raises:
        InvalidRequestError: Naming the argument that is wrong, before sending.
    """
    return DetectCall(image, object, settings, model=model)


def _point(
    image: ImageInput,
    object: str,
    *,
    model: str | None = None,
    settings: SettingsInput = None,
    spatial_refs: SpatialRefs = None,
) -> PointCall:
    """Point at every instance of an object; arguments as ``detect``, plus ``spatial_refs``.

    Raises:
        InvalidRequestError: Naming the argument that is wrong, before sending.
    """
    return PointCall(image, object, settings, spatial_refs, model=model)


def _caption(
    image: ImageInput,
    *,
    length: CaptionLength = "normal",
    model: str | None = None,
    settings: SettingsInput = None,
) -> CaptionCall:
    """Describe an image.

    Args:
        image: A PIL image, a path, encoded bytes or a data URL.
        length: ``"short"``, ``"normal"`` or ``"long"``.
        model: The model id; defaults to the client's.
        settings: Sampling settings; only those set are sent.

    Raises:
        InvalidRequestError: Naming the argument that is wrong, before sending.
    """
    return CaptionCall(image, length, settings, model=model)


_QUERY_STREAM_DOC = """Answer a question as a stream of text chunks; arguments as ``query``.

The call is validated here; it is sent when iteration starts. A failure before the text
begins is retried as any call; one after it raises. Closing the stream early closes the
connection. The async client's stream is an async generator.

Raises:
    InvalidRequestError: Naming the argument that is wrong, before sending.
    APIConnectionError: While iterating, if the stream ends before completing.
"""
_CAPTION_STREAM_DOC = (
    """Describe an image as a stream of text chunks; see ``caption`` and ``query_stream``."""
)


class _StreamMethod(ClientMethod, Generic[P]):
    """A streaming method of both clients: a generator of text, async on the async client.

    Calling it validates the call (``build``'s) at once; the request is sent when
    iteration starts (``_stream``).
    """

    def __init__(self, build: Callable[P, InferenceCall[Any]], doc: str) -> None:
        def method(client: Any, /, *args: P.args, **kwargs: P.kwargs) -> Any:
            return client._stream(client._operation(build(*args, **kwargs), stream=True))

        super().__init__(method, build, doc)

    @overload
    def __get__(self, client: None, owner: type[Any] | None = None) -> Callable[..., Any]: ...

    @overload
    def __get__(
        self, client: BlockingDriver, owner: type[Any] | None = None
    ) -> Callable[P, Generator[str, None, None]]: ...

    @overload
    def __get__(
        self, client: AsyncDriver, owner: type[Any] | None = None
    ) -> Callable[P, AsyncGenerator[str, None]]: ...

    def __get__(self, client: object, owner: type[Any] | None = None) -> Any:
        return self._bound(client)


class _InferenceCore(HttpHolder[HttpClientT]):
    """What both clients share: configuration, building requests, the steps of a call.

    A call is written as steps (``drivers``); the blocking or async driver each client
    class adds carries them out.
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
        http_client: HttpClientT | None = None,
        requests_per_second: float | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self._api_key = resolve_api_key(api_key)
        self.base_url = resolve_inference_url(base_url, tuning_url)
        self.model = check_model(model)
        """The model of calls that name none; ``None`` lets the server answer with its base."""
        self.timeout = timeout
        self.retry_policy = RetryPolicy(max_retries=max_retries)
        self.usage = UsageStats()
        # The account's limit covers inference and tuning alike: the key's one limiter
        # is the tuning client's of the same service.
        self.rate_limiter = rate_limiter or limiter_for(
            self.base_url + "/tuning", self._api_key, requests_per_second
        )
        """The pace of this client's key, shared with every client of the key here."""
        self._hold_http(http_client)

    @classmethod
    def local(
        cls,
        *,
        data_dir: str | Path | None = None,
        model: str | None = None,
        **service_options: Any,
    ) -> Self:
        """A client of the local service running in this process (no port).

        The service is made for this client and closed with it; to share one with a
        tuning client, use ``for_tuning`` on ``TuningClient.local()``.

        Args:
            data_dir: Where the service keeps finetunes; a temporary folder by default.
            model: The model of calls that name none (see ``InferenceClient``).
            **service_options: Passed to ``lightning_moondream.server.create_app``.
        """
        return cls._of_local_app(
            data_dir,
            service_options,
            api_key=LOCAL_API_KEY,
            base_url=LOCAL_INFERENCE_URL,
            model=model,
        )

    @classmethod
    def for_tuning(cls, tuning: ClientCore[HttpClientT], *, model: str | None = None) -> Self:
        """A client of the service ``tuning`` talks to, with its key, timeout and retries.

        It sends through the tuning client's HTTP client, so for ``TuningClient.local()``
        it reaches the same in-process service; it is usable while ``tuning`` is open,
        and closing it leaves ``tuning`` open. The base URL is the tuning URL without
        ``/tuning``.

        Args:
            tuning: The tuning client (an ``AsyncTuningClient`` for the async client).
            model: The model of calls that name none (see ``InferenceClient``).
        """
        return cls(
            api_key=tuning._api_key,
            tuning_url=tuning.base_url,
            timeout=tuning.timeout,
            max_retries=tuning.retry_policy.max_retries,
            model=model,
            http_client=tuning._http,
            rate_limiter=tuning.rate_limiter,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, "
            "api_key='**********')"
        )

    # Requests ---------------------------------------------------------------------------

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

    def _build_request(self, operation: Operation[Any]) -> httpx.Request:
        streams = bool(operation.json.get("stream"))
        headers = {
            "X-Moondream-Auth": self._api_key.get_secret_value(),
            "User-Agent": USER_AGENT,
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if streams else "application/json",
        }
        return self._new_request(
            "POST",
            self.base_url + operation.path,
            request_timeout(self.timeout, operation),
            content=wire.dumps(operation.json),
            headers=headers,
        )

    # Steps ------------------------------------------------------------------------------

    def _answer(
        self, operation: Operation[Any], *, stream: bool = False
    ) -> Steps[tuple[httpx.Response, float]]:
        """Send until an answer comes with a success status, retrying what can be.

        Returns:
            The answer and when its attempt started. A stream's body is still to read,
            and its attempt is counted once it is read (``_count``).
        """
        request = self._build_request(operation)
        attempts = Attempts()

        def settle(
            outcome: Outcome, sent_at: float, started: float
        ) -> Done[tuple[httpx.Response, float]] | float:
            succeeded = isinstance(outcome, httpx.Response) and outcome.is_success
            if not (succeeded and stream):
                self._count(operation, request, started)
            if isinstance(outcome, httpx.Response):
                pace_answer(self.rate_limiter, self.usage, outcome, sent_at)
                if outcome.is_success:
                    return Done((outcome, started))
            return self._retry_delay(operation, attempts, outcome)

        return (yield from paced_attempts(self.rate_limiter, Send(request, stream), settle))

    def _call(self, operation: Operation[R]) -> Steps[R]:
        """The steps of a call answered in one piece."""
        response, _ = yield from self._answer(operation)
        return self._result(operation, response)

    def _count(self, operation: Operation[Any], request: httpx.Request, started: float) -> None:
        elapsed = time.perf_counter() - started
        self.usage.record_attempt(operation.endpoint, elapsed, len(request.content))

    # Answers and errors -----------------------------------------------------------------

    def _label(self, operation: Operation[Any]) -> str:
        model = operation.json.get("model")
        return f"{operation.label} with model {model}" if model else operation.label

    def _scrub(self, text: str) -> str:
        return scrub_key(self._api_key, text)

    def _error(
        self, operation: Operation[Any], outcome: httpx.Response | Exception
    ) -> TuningAPIError:
        """The typed error of a failed attempt, its text scrubbed of the key."""
        if isinstance(outcome, httpx.Response):
            return status_error(self._label(operation), outcome, self._scrub)
        return transport_error(self._label(operation), outcome, self._scrub)

    def _retry_delay(
        self, operation: Operation[Any], attempts: Attempts, outcome: Outcome
    ) -> float:
        """Seconds to wait before retrying a failed attempt (every inference call is safe).

        Raises:
            TuningAPIError: The typed error, when the call fails for good.
        """
        if isinstance(outcome, httpx.Response):
            retryable = should_retry_status(CallKind.SAFE, outcome.status_code)
        else:
            retryable = should_retry_transport(CallKind.SAFE, outcome)
        delay = retry_delay(self.retry_policy, attempts, outcome) if retryable else None
        if delay is not None:
            self.usage.record_retry()
            return delay
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

    # The methods --------------------------------------------------------------------------

    def _call_steps(self, call: InferenceCall[R]) -> Steps[R]:
        """The steps of a call answered in one piece; the call is validated as they start."""
        return (yield from self._call(self._operation(call)))

    query = DrivenMethod(_query, _call_steps)
    detect = DrivenMethod(_detect, _call_steps)
    point = DrivenMethod(_point, _call_steps)
    caption = DrivenMethod(_caption, _call_steps)
    query_stream = _StreamMethod(_query, _QUERY_STREAM_DOC)
    caption_stream = _StreamMethod(_caption, _CAPTION_STREAM_DOC)


class InferenceClient(BlockingDriver, _InferenceCore[httpx.Client]):
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

    def _send(self, operation: Operation[R]) -> R:
        return self._run(self._call(operation))

    def _stream(self, operation: Operation[Any]) -> Generator[str, None, None]:
        response, started = self._run(self._answer(operation, stream=True))
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
            self._count(operation, response.request, started)
        self._stream_ended(operation, reader)

    def many(self, calls: Iterable[InferenceCall[R]], *, max_concurrency: int = 8) -> list[R]:
        """Run many calls at once, at most ``max_concurrency`` in flight.

        Every call is validated before any is sent. Results come in input order; the
        first failure cancels the calls not yet started and is raised.

        Raises:
            InvalidRequestError: Naming the call (``calls[i]``) and argument that is wrong.
        """
        check_concurrency(max_concurrency)
        return self._concurrently(self._send, self._operations(calls), max_concurrency)


class AsyncInferenceClient(AsyncDriver, _InferenceCore[httpx.AsyncClient]):
    """Asynchronous client of Moondream's inference API; arguments as ``InferenceClient``."""

    def _send(self, operation: Operation[R]) -> Coroutine[Any, Any, R]:
        # As ``AsyncTuningClient._execute``: awaiting it awaits ``_run`` itself.
        return self._run(self._call(operation))

    async def _stream(self, operation: Operation[Any]) -> AsyncGenerator[str, None]:
        response, started = await self._run(self._answer(operation, stream=True))
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
            self._count(operation, response.request, started)
        self._stream_ended(operation, reader)

    async def many(self, calls: Iterable[InferenceCall[R]], *, max_concurrency: int = 8) -> list[R]:
        """Run many calls at once, at most ``max_concurrency`` in flight.

        Every call is validated before any is sent. Results come in input order; the
        first failure cancels the others and is raised. From synchronous code, run it on
        a ``BackgroundLoop`` or with ``asyncio.run``.

        Raises:
            InvalidRequestError: Naming the call (``calls[i]``) and argument that is wrong.
        """
        check_concurrency(max_concurrency)
        return await self._concurrently(self._send, self._operations(calls), max_concurrency)
