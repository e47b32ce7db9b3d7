"""HTTP plumbing shared by the routes of both dialects.

The API key header, JSON bodies, listing pages and their cursors, and the API's error
JSON: ``{"error": {"type": ..., "message": ...}}``. The service behind the routes is the
app's ``state.service``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from lightning_moondream.api import wire
from lightning_moondream.api.limits import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MIN_PAGE_SIZE
from lightning_moondream.server.errors import ServiceError
from lightning_moondream.server.service import Service
from lightning_moondream.server.store import AdapterRecord, CheckpointRecord
from lightning_moondream.server.validation import BodyT, validate_body

PREFIX = "/v1/tuning"
INFERENCE_PREFIX = "/v1"
INFERENCE_PATHS = tuple(
    f"{INFERENCE_PREFIX}/{name}" for name in ("query", "detect", "point", "caption")
)
AUTH_HEADER = "X-Moondream-Auth"

RecordT = TypeVar("RecordT", AdapterRecord, CheckpointRecord)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The API's error JSON."""
    body = {"error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def json_answer(answer: Any) -> Response:
    """A JSON answer written directly.

    FastAPI's encoder walks every value in Python, about 2 ms for an answer of 16
    rollouts.
    """
    return Response(wire.dumps(answer), media_type="application/json")


def authenticated(request: Request) -> tuple[Service, str]:
    """The app's service, and the owner id of the request's API key.

    Raises:
        ServiceError: 401 without a key, or with one that is not accepted.
    """
    service: Service = request.app.state.service
    key = request.headers.get(AUTH_HEADER, "")
    if not key.strip():
        raise ServiceError(401, f"missing API key: send it in the {AUTH_HEADER} header")
    return service, service.authenticate(key)


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object (its size is limited by the ``BodyLimit`` middleware).

    Raises:
        ServiceError: 413 if too large, 400 if not a JSON object.
    """
    try:
        body = wire.loads(await request.body())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ServiceError(400, "body: not valid JSON") from exc
    if not isinstance(body, dict):
        raise ServiceError(400, "body: must be a JSON object")
    return body


async def parse_body(request: Request, model: type[BodyT]) -> BodyT:
    """The request's JSON body validated as ``model``.

    Raises:
        ServiceError: 413 if too large, 400 if not a JSON object, 422 naming a bad field.
    """
    return validate_body(await json_body(request), model)


def encode_cursor(seq: int) -> str:
    """The pagination cursor of the position after ``seq``."""
    return base64.urlsafe_b64encode(json.dumps({"after": seq}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int:
    """The position a pagination cursor continues after (0 without a cursor).

    Raises:
        ServiceError: 400 for a malformed cursor.
    """
    if cursor is None:
        return 0
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        after = value["after"]
    except (binascii.Error, UnicodeError, ValueError, TypeError, KeyError) as exc:
        raise ServiceError(400, "cursor: malformed pagination cursor") from exc
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise ServiceError(400, "cursor: malformed pagination cursor")
    return after


def _page_limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return DEFAULT_PAGE_SIZE
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not MIN_PAGE_SIZE <= limit <= MAX_PAGE_SIZE:
        raise ServiceError(
            422, f"limit: must be an integer from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}, got {raw!r}"
        )
    return limit


def page_query(request: Request) -> tuple[int, int]:
    """The page a listing asks for: its ``limit``, and the position its cursor continues after.

    Raises:
        ServiceError: 422 for a bad ``limit`` (checked first), 400 for a malformed cursor.
    """
    return _page_limit(request), decode_cursor(request.query_params.get("cursor"))


@dataclass(frozen=True)
class Page(Generic[RecordT]):
    """One page of a listing, oldest first.

    Attributes:
        records: The page's records.
        more: Whether more records follow.
    """

    records: list[RecordT]
    more: bool

    @property
    def next_cursor(self) -> str | None:
        """The cursor of the page after this one, ``None`` on the last page."""
        return encode_cursor(self.records[-1].seq) if self.more else None


def adapters_page(request: Request) -> Page[AdapterRecord]:
    """The page of the caller's adapters a listing asks for.

    Raises:
        ServiceError: As ``authenticated``, then as ``page_query``.
    """
    service, owner = authenticated(request)
    return Page(*service.list_adapters(owner, *page_query(request)))


def checkpoints_page(request: Request, adapter_id: str) -> Page[CheckpointRecord]:
    """The page of an adapter's checkpoints a listing asks for.

    Raises:
        ServiceError: As ``authenticated``, then as ``page_query``, then 404 unless the
            caller has this adapter.
    """
    service, owner = authenticated(request)
    return Page(*service.list_checkpoints(owner, adapter_id, *page_query(request)))
