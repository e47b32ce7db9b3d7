"""Typed errors of the tuning API client: one class per kind of failure.

Every error carries the HTTP status (``None`` when no response arrived), the server's
message and the request id when the server sent one. None of them ever contains the API
key: messages from the server are scrubbed of it before they are stored.
"""

from __future__ import annotations


class TuningAPIError(Exception):
    """Base class of every error raised by the tuning API client.

    Attributes:
        message: What went wrong, in words.
        status_code: The HTTP status, or ``None`` if no response arrived.
        request_id: The server's request id, if it sent one.
    """

    def __init__(
        self, message: str, *, status_code: int | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.request_id = request_id

    def __str__(self) -> str:
        details = [f"status {self.status_code}"] if self.status_code is not None else []
        if self.request_id:
            details.append(f"request id {self.request_id}")
        return f"{self.message} ({', '.join(details)})" if details else self.message


class MissingAPIKeyError(TuningAPIError):
    """No API key was given and ``MOONDREAM_API_KEY`` is not set."""


class InvalidRequestError(TuningAPIError):
    """The request is invalid: found before sending, or answered 400, 413 or 422."""


class AuthenticationError(TuningAPIError):
    """The API key was refused (401 or 403)."""


class NotFoundError(TuningAPIError):
    """The adapter or checkpoint does not exist, or belongs to another key (404)."""


class ConflictError(TuningAPIError):
    """The request conflicts with the current state of the resource (409)."""


class RateLimitError(TuningAPIError):
    """Too many requests (429).

    Attributes:
        retry_after: Seconds the server asked to wait, if it said.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = 429,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, request_id=request_id)
        self.retry_after = retry_after


class ServerError(TuningAPIError):
    """The server failed (5xx) or answered something that is not the API's JSON."""


class APIConnectionError(TuningAPIError):
    """No response arrived: the connection failed or was dropped."""


class APITimeoutError(APIConnectionError):
    """No response arrived in time."""


class AmbiguousRequestError(TuningAPIError):
    """A state-changing request failed in a way that leaves its effect unknown.

    The server may or may not have applied it (a train step, a new adapter, a checkpoint).
    It was not retried, because applying it twice would silently corrupt the adapter.

    Attributes:
        cause: The underlying failure (a timeout, a dropped connection, a 5xx).
    """

    def __init__(self, operation: str, cause: TuningAPIError, *, facts: str = "") -> None:
        super().__init__(
            f"{operation} failed ({cause.message}); it may or may not have been applied, and it "
            "was not retried so that it cannot be applied twice" + (f"; {facts}" if facts else ""),
            status_code=cause.status_code,
            request_id=cause.request_id,
        )
        self.operation = operation
        self.cause = cause


_STATUS_ERRORS: dict[int, type[TuningAPIError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: InvalidRequestError,
    422: InvalidRequestError,
    429: RateLimitError,
}


def error_class_for_status(status_code: int) -> type[TuningAPIError]:
    """Return the error class for an HTTP error status."""
    if status_code in _STATUS_ERRORS:
        return _STATUS_ERRORS[status_code]
    if status_code >= 500:
        return ServerError
    return InvalidRequestError if 400 <= status_code < 500 else ServerError


class UnsupportedFeatureError(TuningAPIError):
    """The dialect the service speaks cannot carry this feature; nothing was sent.

    Attributes:
        feature: What was asked for, e.g. ``"SFT groups"``.
        dialect: The dialect that cannot carry it.
    """

    def __init__(self, feature: str, dialect: str) -> None:
        super().__init__(f"{feature} is not supported by the /{dialect} dialect of the tuning API")
        self.feature = feature
        self.dialect = dialect
