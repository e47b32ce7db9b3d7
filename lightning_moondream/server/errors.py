"""The local service's domain error: a refusal carrying the API's status and message."""

from __future__ import annotations


class ServiceError(Exception):
    """A request the service refuses, answered as the API's error JSON.

    Args:
        status: The HTTP status the refusal is answered with (e.g. 404, 409, 422).
        message: What is wrong, naming the field, id or limit concerned.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
