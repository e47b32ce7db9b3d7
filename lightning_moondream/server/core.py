"""The shared core of the local tuning service, under both API dialects.

The service state (store, engine, adapter cache, locks), authentication, body parsing,
request validation and the model work live here; ``routes_adapters`` and
``routes_finetunes`` are thin routers over it, so an adapter is one and the same thing
through either dialect (a finetune id is its adapter id).

Model work runs in worker threads, never on the event loop. Train steps on one adapter
are serialized by a per-adapter lock; a rollout reads the adapter state current when it
starts, and a train step swaps in a complete new state when it ends, so a rollout never
sees a half-updated adapter.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import random
import statistics
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import anyio
import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import Message, Receive, Scope, Send

from lightning_moondream.api import wire
from lightning_moondream.api.models import (
    AnyRequest,
    check_num_rollouts,
    check_rank,
    check_rewards,
    parse_ground_truth,
    parse_request,
    validation_message,
)
from lightning_moondream.images import ImageError, decode_data_url
from lightning_moondream.rewards import ground_truth_reward
from lightning_moondream.server import codec, signing
from lightning_moondream.server.engine import (
    AdapterState,
    Engine,
    StepStats,
    SupervisedGroup,
    Task,
    TrainGroup,
)
from lightning_moondream.server.faults import DroppedConnection, FaultInjector, endpoint_of
from lightning_moondream.server.policy import Decoding
from lightning_moondream.server.store import AdapterRecord, CheckpointRecord, Store, is_adapter_id
from lightning_moondream.server.targets import target_tokens

PREFIX = "/v1/tuning"
AUTH_HEADER = "X-Moondream-Auth"
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 20, 100
CACHED_ADAPTERS = 64
"""Adapter states kept in memory; others are read from their weight files on use."""

SAMPLE_COUNTS = 65536
"""Requests whose repeat count is kept for sampling seeds (see ``Service.sampling_seed``)."""

DROP = "lightning_moondream.drop"
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


BodyT = TypeVar("BodyT", bound=BaseModel)
_EXTENSIONS = ("reasoning", "spatial_refs")
"""Request fields newer than the spec, validated by the service itself."""
MAX_SPATIAL_REFS = 64
_GROUP_FIELDS = {
    "rl": {"mode", "request", "rollouts", "rewards"},
    "sft": {"mode", "request", "target"},
}
"""The fields a train group of each mode may have."""


@dataclass(frozen=True)
class ParsedRequest:
    """A validated skill request.

    Attributes:
        request: The spec's fields as the API's request model.
        reasoning: Whether a query asked for its reasoning.
        spatial_refs: Normalized ``(x, y)`` points and ``(x_min, y_min, x_max, y_max)``
            boxes the request refers to.
    """

    request: AnyRequest
    reasoning: bool = False
    spatial_refs: tuple[tuple[float, ...], ...] = ()

    @property
    def skill(self) -> str:
        """The request's skill."""
        return self.request.skill

    def anchors(self) -> list[tuple[float, float]]:
        """The center of each spatial ref."""
        return [
            (ref[0], ref[1]) if len(ref) == 2 else ((ref[0] + ref[2]) / 2, (ref[1] + ref[3]) / 2)
            for ref in self.spatial_refs
        ]


def _spatial_refs(value: Any, where: str) -> tuple[tuple[float, ...], ...]:
    """Validate ``spatial_refs``: points ``[x, y]`` or boxes ``[x1, y1, x2, y2]`` in [0, 1].

    Raises:
        ApiError: 422 naming the ref that is wrong.
    """
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_SPATIAL_REFS:
        raise ApiError(
            422,
            f"{where}: must be a list of at most {MAX_SPATIAL_REFS} [x, y] points or "
            "[x_min, y_min, x_max, y_max] boxes",
        )
    refs = []
    for index, ref in enumerate(value):
        if (
            not isinstance(ref, list)
            or len(ref) not in (2, 4)
            or not all(is_finite_number(number) and 0.0 <= number <= 1.0 for number in ref)
        ):
            raise ApiError(422, f"{where}[{index}]: must be 2 or 4 numbers in [0, 1], got {ref!r}")
        if len(ref) == 4 and not (ref[0] < ref[2] and ref[1] < ref[3]):
            raise ApiError(
                422, f"{where}[{index}]: a box needs x_min < x_max and y_min < y_max, got {ref!r}"
            )
        refs.append(tuple(float(number) for number in ref))
    return tuple(refs)


def is_finite_number(value: Any) -> bool:
    """Whether a JSON value is a finite number (``true`` and ``false`` are not numbers)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_lr(value: Any) -> float | None:
    """Validate a train step's learning rate: absent, or a finite number >= 0.

    Raises:
        ApiError: 422 naming ``lr``.
    """
    if value is None:
        return None
    if not is_finite_number(value) or value < 0:
        raise ApiError(422, f"lr: must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SampledRollout:
    """One rollout as the service made it, before a dialect shapes its JSON.

    Attributes:
        skill: The request's skill.
        tokens: Sampled answer tokens.
        logprobs: Their recorded log-probabilities.
        output: The decoded output in the spec's shape (detect boxes under ``boxes``).
        signature: HMAC binding the rollout to its adapter and request.
        reasoning: ``{"text", "grounding", "tokens"}`` if the request asked for it.
    """

    skill: str
    tokens: list[int]
    logprobs: list[float]
    output: dict[str, Any]
    signature: str
    reasoning: dict[str, Any] | None = None

    @property
    def finish_reason(self) -> str:
        """``"stop"`` if the sequence ended on its end token, else ``"length"``."""
        end = codec.ANSWER_END if self.skill == "query" else codec.COORD_END
        return "stop" if self.tokens and self.tokens[-1] == end else "length"

    @property
    def coords(self) -> list[float]:
        """Normalized coordinates of a point or detect rollout (empty for query)."""
        return codec.coordinates(self.skill, self.tokens)


@dataclass(frozen=True)
class StepReport:
    """The answer to a train step.

    Attributes:
        step: Train steps of the adapter after this one.
        applied: Whether the step changed the adapter and was counted (not at lr 0).
        stats: The update's KL, gradient norm and SFT loss.
        reward_mean: Mean reward over the RL groups' rollouts (``None`` without any).
        reward_std: Their population standard deviation.
    """

    step: int
    applied: bool
    stats: StepStats
    reward_mean: float | None
    reward_std: float | None

    def to_json(self) -> dict[str, Any]:
        """The ``/finetunes`` dialect's train step answer."""
        return {
            "step": self.step,
            "applied": self.applied,
            "kl": self.stats.kl,
            # The reference policy has no mixture-of-experts router.
            "router_kl": None,
            "grad_norm": self.stats.grad_norm,
            "sft_loss": self.stats.sft_loss,
            "reward_mean": self.reward_mean,
            "reward_std": self.reward_std,
        }


class RolloutsBody(Protocol):
    """The fields of a ``/rollouts`` body that both dialects share (the id aside)."""

    num_rollouts: int
    request: dict[str, Any]
    ground_truth: dict[str, Any] | None


def rollout_fields(rollout: dict[str, Any], where: str) -> tuple[list[int], list[float], str]:
    """The training metadata of a rollout passed back to ``/train_step``.

    Raises:
        ApiError: 422 if it is missing or malformed.
    """
    tokens, logprobs, signature = (
        rollout.get("answer_tokens"),
        rollout.get("logprobs"),
        rollout.get("signature"),
    )
    if (
        not isinstance(tokens, list)
        or not all(isinstance(token, int) and not isinstance(token, bool) for token in tokens)
        or not isinstance(logprobs, list)
        or not all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in logprobs
        )
        or len(tokens) != len(logprobs)
        or not tokens
        or not isinstance(signature, str)
    ):
        raise ApiError(
            422,
            f"{where}: training metadata (answer_tokens, logprobs, signature) missing or malformed; "
            "pass rollouts back exactly as received",
        )
    return tokens, [float(value) for value in logprobs], signature


class ApiError(Exception):
    """An error answered as the API's error JSON."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The API's error JSON."""
    body = {"error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def encode_cursor(seq: int) -> str:
    """The pagination cursor of the position after ``seq``."""
    return base64.urlsafe_b64encode(json.dumps({"after": seq}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int:
    """The position a pagination cursor continues after (0 without a cursor).

    Raises:
        ApiError: 400 for a malformed cursor.
    """
    if cursor is None:
        return 0
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        after = value["after"]
    except (binascii.Error, UnicodeError, ValueError, TypeError, KeyError) as exc:
        raise ApiError(400, "cursor: malformed pagination cursor") from exc
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise ApiError(400, "cursor: malformed pagination cursor")
    return after


def _page_limit(request: Request) -> int:
    """The request's ``limit`` query parameter, checked.

    Raises:
        ApiError: 422 outside 1 to ``MAX_PAGE_SIZE``.
    """
    raw = request.query_params.get("limit")
    if raw is None:
        return DEFAULT_PAGE_SIZE
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ApiError(422, f"limit: must be an integer from 1 to {MAX_PAGE_SIZE}, got {raw!r}")
    return limit


def page_query(request: Request) -> tuple[int, int]:
    """The page a listing asks for: its ``limit``, and the position its cursor continues after.

    Raises:
        ApiError: 422 for a bad ``limit`` (checked first), 400 for a malformed cursor.
    """
    return _page_limit(request), decode_cursor(request.query_params.get("cursor"))


def next_cursor(
    records: Sequence[AdapterRecord] | Sequence[CheckpointRecord], more: bool
) -> str | None:
    """The cursor of the page after ``records``, ``None`` on the last page."""
    return encode_cursor(records[-1].seq) if more else None


class TuningApp(FastAPI):
    """FastAPI app with latency and fault injection in front of its routes.

    Injection sits outside FastAPI's own middleware so that a dropped connection is
    really dropped, not turned into a 500 by its error handler. Latency is the least
    time an answer takes from the request's arrival: the handler runs at once and its
    answer is held until then, so the service's own work falls within the latency, as
    a remote service's would, and a lone request takes exactly the latency.
    """

    latency: dict[str, float]
    faults: FaultInjector

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        endpoint = endpoint_of(scope["path"])
        answer_at = anyio.current_time() + (self.latency.get(endpoint, 0.0) if endpoint else 0.0)
        # Let requests sent together all arrive, and start their latency, before any is
        # handled: in process, handling one would otherwise hold up the client's next sends.
        await anyio.sleep(0)
        fault = self.faults.before(endpoint) if endpoint is not None else None
        if fault is not None:
            await _sleep_until(answer_at)
            if fault == "drop":
                await _drop(send)
            headers = {"Retry-After": str(self.faults.config.retry_after)} if fault == "429" else {}
            response = error_response(int(fault), f"injected failure ({fault})", headers)
            await response(scope, receive, send)
            return

        async def held_send(message: Message) -> None:
            # A handler that asked for a drop has acted; its response must not go out.
            if scope.get(DROP):
                return
            if message["type"] == "http.response.start":
                await _sleep_until(answer_at)
            await send(message)

        await super().__call__(scope, receive, held_send)
        if scope.get(DROP):
            await _sleep_until(answer_at)
            await _drop(send)


async def _sleep_until(deadline: float) -> None:
    delay = deadline - anyio.current_time()
    if delay > 0:
        await anyio.sleep(delay)


async def _drop(send: Send) -> None:
    # Start a response, then fail: uvicorn then closes the connection mid-response
    # (before the start, it would answer a clean 500 instead).
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    raise DroppedConnection("connection dropped by fault injection")


class Service:
    """State and handlers behind the routes: store, engine, adapter cache, locks."""

    def __init__(
        self,
        store: Store,
        engine: Engine,
        api_keys: Collection[str] | None,
        faults: FaultInjector,
        max_body_bytes: int,
        max_pixels: int,
        seed: int,
        checkpoint_retention_ms: int | None = None,
        owner_key: str | None = None,
    ) -> None:
        self.store = store
        self._acting_owner = None if owner_key is None else self._owner(owner_key)
        self.checkpoint_retention_ms = checkpoint_retention_ms
        self.engine = engine
        self.owners = None if api_keys is None else {self._owner(key) for key in api_keys}
        self.faults = faults
        self.max_body_bytes = max_body_bytes
        self.max_pixels = max_pixels
        self._seed = seed
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._sample_counts: OrderedDict[tuple[str, int, str], int] = OrderedDict()
        self._states: OrderedDict[str, AdapterState] = OrderedDict()
        self._train_locks: dict[str, threading.Lock] = {}

    @staticmethod
    def _owner(key: str) -> str:
        # Rows are keyed by a digest of the key: the key itself is never stored.
        return hashlib.sha256(key.encode()).hexdigest()

    def authenticate(self, request: Request) -> str:
        """The owner id of the request's API key.

        Raises:
            ApiError: 401 without a key, or with one that is not accepted.
        """
        key = request.headers.get(AUTH_HEADER, "")
        if not key.strip():
            raise ApiError(401, f"missing API key: send it in the {AUTH_HEADER} header")
        owner = self._owner(key)
        if self.owners is not None and not any(
            hmac.compare_digest(owner, known) for known in self.owners
        ):
            raise ApiError(401, "invalid API key")
        return self._acting_owner or owner

    async def json_body(self, request: Request) -> dict[str, Any]:
        """The request's JSON object, read within the size limit.

        Raises:
            ApiError: 413 if too large, 400 if not a JSON object.
        """
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ApiError(413, f"request body exceeds {self.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"request body exceeds {self.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            body = wire.loads(b"".join(chunks))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError(400, "body: not valid JSON") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "body: must be a JSON object")
        return body

    async def parse_body(self, request: Request, model: type[BodyT]) -> BodyT:
        """The request's JSON body validated as ``model``.

        Raises:
            ApiError: 413 if too large, 400 if not a JSON object, 422 naming a bad field.
        """
        return self.validate_body(await self.json_body(request), model)

    @staticmethod
    def validate_body(body: dict[str, Any], model: type[BodyT]) -> BodyT:
        """A JSON body validated as ``model``.

        Raises:
            ApiError: 422 naming a bad field.
        """
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise ApiError(422, validation_message(exc, "")) from exc

    def after_train_step(self, request: Request) -> None:
        """Inject the configured failure of an applied train step, if one is drawn.

        Raises:
            ApiError: 500 when the drawn failure is an error answer.
        """
        failure = self.faults.after_train_step()
        if failure == "drop":
            request.scope[DROP] = True
        elif failure is not None:
            raise ApiError(500, "injected failure after the train step was applied")

    def seed(self) -> int:
        """A fresh seed from the service's seeded stream."""
        with self._lock:
            return self._random.getrandbits(63)

    def sampling_seed(self, adapter: AdapterRecord, request_digest: str) -> int:
        """The sampling seed of a rollouts request, independent of arrival order.

        It is a hash of the service seed, the adapter, its train step count, the request
        and how many times this request was already sampled at that step count, so
        concurrent requests get the same seeds whatever order they arrive in, and a
        repeated request still draws fresh samples. The adapter enters by its creation
        position rather than its id: ids are random, positions repeat from run to run.
        """
        count_key = (adapter.adapter_id, adapter.train_steps, request_digest)
        with self._lock:
            repeat = self._sample_counts.pop(count_key, 0)
            self._sample_counts[count_key] = repeat + 1
            # A forgotten count only makes a long-unseen request reuse earlier seeds.
            while len(self._sample_counts) > SAMPLE_COUNTS:
                self._sample_counts.popitem(last=False)
        key = f"{self._seed}:{adapter.seq}:{adapter.train_steps}:{request_digest}:{repeat}"
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1

    # Adapter state -------------------------------------------------------------------

    def state(self, adapter_id: str) -> AdapterState:
        """The adapter's current state (from memory, else from its weight file)."""
        with self._lock:
            state = self._states.get(adapter_id)
            if state is not None:
                self._states.move_to_end(adapter_id)
                return state
        state = AdapterState.from_dict(self.store.load_state(self.store.adapter_path(adapter_id)))
        self.remember(adapter_id, state)
        return state

    def remember(self, adapter_id: str, state: AdapterState) -> None:
        """Make ``state`` the adapter's current state in memory."""
        with self._lock:
            self._states[adapter_id] = state
            self._states.move_to_end(adapter_id)
            while len(self._states) > CACHED_ADAPTERS:
                self._states.popitem(last=False)

    def forget(self, adapter_id: str) -> None:
        """Drop a deleted adapter from memory."""
        with self._lock:
            self._states.pop(adapter_id, None)
            self._train_locks.pop(adapter_id, None)

    def train_lock(self, adapter_id: str) -> threading.Lock:
        """The lock serializing train steps of one adapter."""
        with self._lock:
            return self._train_locks.setdefault(adapter_id, threading.Lock())

    # Requests ------------------------------------------------------------------------

    def parse_request(self, raw: Any, where: str) -> ParsedRequest:
        """Validate a skill request exactly as the client does, image included.

        ``reasoning`` and ``spatial_refs`` are validated here, the rest by the API's
        request models.

        Raises:
            ApiError: 400 for an unreadable image, 422 for any other invalid field.
        """
        if not isinstance(raw, dict):
            raise ApiError(422, f"{where}: must be an object")
        base = {key: value for key, value in raw.items() if key not in _EXTENSIONS}
        try:
            request = parse_request(base, wire=True, max_pixels=self.max_pixels)
        except ValidationError as exc:
            # An image that is there but unreadable is a bad payload (400), not a bad field.
            unreadable_image = all(
                item["loc"][-1:] == ("image_url",) and item["type"] == "value_error"
                for item in exc.errors()
            )
            raise ApiError(
                400 if unreadable_image else 422, validation_message(exc, where)
            ) from exc
        reasoning = raw.get("reasoning", False)
        if not isinstance(reasoning, bool):
            raise ApiError(422, f"{where}.reasoning: must be true or false")
        if reasoning and request.skill != "query":
            raise ApiError(422, f"{where}.reasoning: only valid for query, not {request.skill}")
        refs = _spatial_refs(raw.get("spatial_refs"), f"{where}.spatial_refs")
        return ParsedRequest(request, reasoning, refs)

    def task(self, parsed: ParsedRequest) -> Task:
        """Decode a validated request into what the engine samples for."""
        request = parsed.request
        settings = request.settings
        image_url = getattr(request, "image_url", None)
        try:
            image = (
                decode_data_url(image_url, max_pixels=self.max_pixels)
                if image_url and self.engine.reads_pixels
                else None
            )
        except ImageError as exc:
            # Validation read only the header; a payload broken past it shows up here.
            raise ApiError(400, f"request.{exc}") from exc
        prompt = request.question if request.skill == "query" else request.object
        return Task(
            skill=request.skill,
            prompt=prompt,
            image=image,
            rules=Decoding.for_request(
                request.skill,
                settings.max_tokens if settings else 128,
                settings.max_objects if settings else None,
            ),
            temperature=settings.temperature if settings else 1.0,
            top_p=settings.top_p if settings else 1.0,
        )

    def get_adapter_or_404(self, owner: str, adapter_id: str) -> AdapterRecord:
        """The owner's adapter record; raise 404 unless the owner has this adapter."""
        record = self.store.get_adapter(owner, adapter_id)
        if record is None:
            raise ApiError(404, f"adapter {adapter_id!r} not found")
        return record

    # Operations shared by both dialects ----------------------------------------------

    async def create_adapter(
        self, owner: str, name: str, rank: int, from_checkpoint: str | None = None
    ) -> AdapterRecord:
        """Create an adapter, fresh or from one of the owner's checkpoints.

        Raises:
            ApiError: 422 for a bad rank, 404 for an unknown checkpoint.
        """
        try:
            check_rank(rank)
        except ValueError as exc:
            raise ApiError(422, f"rank: {exc}") from exc
        if from_checkpoint is not None:
            checkpoint = self.store.get_checkpoint(owner, from_checkpoint)
            if checkpoint is None:
                raise ApiError(404, f"from_checkpoint: checkpoint {from_checkpoint!r} not found")
            path = self.store.checkpoint_path(checkpoint.checkpoint_id)
            state = AdapterState.from_dict(await run_in_threadpool(self.store.load_state, path))
            if state.rank != rank:
                raise ApiError(
                    422,
                    f"rank: {rank} differs from the rank {state.rank} of checkpoint {from_checkpoint}",
                )
        else:
            state = self.engine.new_adapter(rank, self.seed())
        return await run_in_threadpool(
            self.store.create_adapter, owner, name, rank, state.to_dict()
        )

    async def read_adapter(self, owner: str, adapter_id: str) -> AdapterRecord:
        """The owner's adapter, its train steps counting a step still running.

        Raises:
            ApiError: 404 unless the owner has this adapter.
        """

        def read() -> AdapterRecord:
            self.get_adapter_or_404(owner, adapter_id)
            # A client that gave up waiting for a train step reads train_steps back to
            # learn whether it was applied: a step still running must be counted, so the
            # read waits for it instead of racing it.
            with self.train_lock(adapter_id):
                return self.get_adapter_or_404(owner, adapter_id)

        return await run_in_threadpool(read)

    async def delete_adapter(self, owner: str, adapter_id: str) -> None:
        """Delete the owner's adapter with its checkpoints and metrics.

        Raises:
            ApiError: 404 unless the owner has this adapter.
        """

        def delete() -> bool:
            # Wait for a running train step, so it cannot write the files back afterwards.
            with self.train_lock(adapter_id):
                return self.store.delete_adapter(owner, adapter_id)

        if not is_adapter_id(adapter_id) or not await run_in_threadpool(delete):
            raise ApiError(404, f"adapter {adapter_id!r} not found")
        self.forget(adapter_id)

    async def save_checkpoint(self, owner: str, adapter_id: str) -> CheckpointRecord:
        """Save the adapter's current state as a checkpoint at its current step.

        Raises:
            ApiError: 404 unless the owner has this adapter.
        """

        def save() -> CheckpointRecord:
            # Under the train lock, the state and its step count belong together.
            with self.train_lock(adapter_id):
                record = self.get_adapter_or_404(owner, adapter_id)
                return self.store.create_checkpoint(
                    owner,
                    adapter_id,
                    self.state(adapter_id).to_dict(),
                    step=record.train_steps,
                    retention_ms=self.checkpoint_retention_ms,
                )

        return await run_in_threadpool(save)

    async def rollouts(
        self,
        owner: str,
        adapter_id: str,
        body: RolloutsBody,
        shape: Callable[[SampledRollout], dict[str, Any]],
    ) -> Response:
        """Answer ``/rollouts``: sample, score against any ground truth, and write the answer.

        Args:
            owner: The caller's owner id.
            adapter_id: The adapter to sample from.
            body: The validated body.
            shape: The dialect's JSON of one rollout.

        Raises:
            ApiError: As ``sample_rollouts``.
        """
        items, rewards = await self.sample_rollouts(
            owner, adapter_id, body.num_rollouts, body.request, body.ground_truth
        )
        answer = {
            "request": body.request,
            "rollouts": [shape(item) for item in items],
            "rewards": rewards,
        }
        # Written directly: FastAPI's encoder walks every value in Python, about 2 ms
        # for an answer of 16 rollouts.
        return Response(wire.dumps(answer), media_type="application/json")

    async def sample_rollouts(
        self,
        owner: str,
        adapter_id: str,
        num_rollouts: int,
        raw_request: dict[str, Any],
        raw_ground_truth: dict[str, Any] | None,
    ) -> tuple[list[SampledRollout], list[float] | None]:
        """Sample rollouts of a request, with server rewards if ground truth is given.

        Raises:
            ApiError: 422 for an invalid field, 400 for an unreadable image, 404 for an
                unknown adapter.
        """
        try:
            check_num_rollouts(num_rollouts)
        except ValueError as exc:
            raise ApiError(422, f"num_rollouts: {exc}") from exc
        parsed = self.parse_request(raw_request, "request")
        try:
            ground_truth = parse_ground_truth(parsed.skill, raw_ground_truth)
        except ValidationError as exc:
            raise ApiError(422, validation_message(exc, "ground_truth")) from exc
        except ValueError as exc:
            raise ApiError(422, f"ground_truth: {exc}") from exc
        record = self.get_adapter_or_404(owner, adapter_id)
        digest = signing.request_digest(raw_request)
        seed = self.sampling_seed(record, digest)

        def sample() -> list[SampledRollout]:
            state = self.state(adapter_id)
            task = self.task(parsed)
            generator = torch.Generator().manual_seed(seed)
            samples = self.engine.sample(state, task, num_rollouts, generator)
            items = []
            for sample in samples:
                output = codec.decode(parsed.skill, sample.tokens)
                reasoning = (
                    codec.reasoning(output["answer"], parsed.anchors())
                    if parsed.reasoning
                    else None
                )
                signature = signing.sign_rollout(
                    self.store.secret, adapter_id, digest, sample.tokens, sample.logprobs
                )
                items.append(
                    SampledRollout(
                        parsed.skill, sample.tokens, sample.logprobs, output, signature, reasoning
                    )
                )
            return items

        items = await run_in_threadpool(sample)
        rewards = None
        if ground_truth is not None:
            truth = ground_truth.model_dump(mode="json", exclude_none=True)
            rewards = [ground_truth_reward(parsed.skill, item.output, truth) for item in items]
        return items, rewards

    def verify_rl_group(
        self, adapter_id: str, where: str, group: Mapping[str, Any]
    ) -> tuple[ParsedRequest, TrainGroupInput]:
        """Check an RL group's request, rollouts (signatures) and rewards.

        Raises:
            ApiError: 422 naming a bad field, 400 for a changed or foreign rollout.
        """
        request, rollouts = group.get("request"), group.get("rollouts")
        parsed = self.parse_request(request, f"{where}.request")
        assert isinstance(request, dict)
        if not isinstance(rollouts, list) or not rollouts:
            raise ApiError(
                422, f"{where}.rollouts: must be the non-empty list of rollouts received"
            )
        try:
            rewards = check_rewards(group.get("rewards"), len(rollouts), where=f"{where}.rewards")
        except ValueError as exc:
            raise ApiError(422, str(exc)) from exc
        digest = signing.request_digest(request)
        all_tokens, all_logprobs = [], []
        for number, rollout in enumerate(rollouts):
            place = f"{where}.rollouts[{number}]"
            if not isinstance(rollout, dict):
                raise ApiError(422, f"{place}: must be the rollout object as received")
            tokens, logprobs, signature = rollout_fields(rollout, place)
            if rollout.get("skill") != parsed.skill or not signing.verify_rollout(
                self.store.secret, adapter_id, digest, tokens, logprobs, signature
            ):
                raise ApiError(
                    400,
                    f"{place}: signature mismatch; the rollout was changed, or was sampled for "
                    "another adapter or request",
                )
            all_tokens.append(tokens)
            all_logprobs.append(logprobs)
        return parsed, TrainGroupInput(all_tokens, all_logprobs, rewards)

    def supervised_group(
        self, where: str, group: Mapping[str, Any]
    ) -> tuple[ParsedRequest, list[int]]:
        """Check an SFT group's request and target; the target as tokens.

        Raises:
            ApiError: 422 naming a bad or missing field.
        """
        parsed = self.parse_request(group.get("request"), f"{where}.request")
        if "target" not in group:
            raise ApiError(422, f"{where}.target: required for an sft group")
        rules = Decoding.for_request(
            parsed.skill,
            parsed.request.settings.max_tokens if parsed.request.settings else 128,
            parsed.request.settings.max_objects if parsed.request.settings else None,
        )
        try:
            tokens = target_tokens(parsed.skill, group["target"], rules)
        except ValueError as exc:
            raise ApiError(422, f"{where}.target: {exc}") from exc
        return parsed, tokens

    async def train_step(
        self,
        owner: str,
        adapter_id: str,
        groups: Sequence[Any],
        lr: float | None,
        request: Request,
    ) -> StepReport:
        """Answer ``/train_step``: verify the groups, apply the step, inject after-step faults.

        Groups are checked in order, each in full before the next: its shape (an object,
        a known ``mode`` and only that mode's fields), then an RL group's request, rollout
        signatures and rewards, or an SFT group's request and target. A dialect whose wire
        takes fewer groups refuses the others before calling this.

        Args:
            owner: The caller's owner id.
            adapter_id: The adapter to train.
            groups: The body's groups as sent.
            lr: The checked learning rate; the engine's default if ``None``.
            request: The HTTP request, which an injected drop acts on.

        Raises:
            ApiError: 404 for an unknown adapter (checked before the groups), 422 naming a
                bad group field, 400 for a changed or foreign rollout, 500 for an injected
                failure after the step was applied.
        """
        self.get_adapter_or_404(owner, adapter_id)
        rl: list[tuple[ParsedRequest, TrainGroupInput]] = []
        sft: list[tuple[ParsedRequest, list[int]]] = []
        for index, group in enumerate(groups):
            where = f"groups[{index}]"
            if not isinstance(group, dict):
                raise ApiError(422, f"{where}: must be an rl or sft group object")
            mode = group.get("mode", "rl")
            # A tuple, not the dict: an unhashable mode must be refused, not raise.
            if mode not in ("rl", "sft"):
                raise ApiError(422, f"{where}.mode: must be 'rl' or 'sft', got {mode!r}")
            unknown = sorted(set(group) - _GROUP_FIELDS[mode])
            if unknown:
                raise ApiError(
                    422, f"{where}: field(s) {', '.join(unknown)} not valid in an {mode} group"
                )
            if mode == "rl":
                rl.append(self.verify_rl_group(adapter_id, where, group))
            else:
                sft.append(self.supervised_group(where, group))
        report = await self.train(owner, adapter_id, rl, sft, lr)
        self.after_train_step(request)
        return report

    async def train(
        self,
        owner: str,
        adapter_id: str,
        rl: Sequence[tuple[ParsedRequest, TrainGroupInput]],
        sft: Sequence[tuple[ParsedRequest, list[int]]],
        lr: float | None,
    ) -> StepReport:
        """Apply one verified train step; at ``lr`` 0 compute it but change nothing.

        Raises:
            ApiError: 404 if the adapter was deleted meanwhile.
        """
        rewards = [reward for _, group in rl for reward in group.rewards]

        def apply() -> StepReport | None:
            with self.train_lock(adapter_id):
                state = self.state(adapter_id)
                groups = [
                    TrainGroup(self.task(parsed), group.tokens, group.logprobs, group.rewards)
                    for parsed, group in rl
                ]
                targets = [SupervisedGroup(self.task(parsed), tokens) for parsed, tokens in sft]
                new_state, stats = self.engine.train(state, groups, targets, lr)
                if lr == 0:
                    record = self.store.get_adapter(owner, adapter_id)
                    if record is None:
                        return None
                    return StepReport(record.train_steps, False, stats, *_spread(rewards))
                if not self.store.record_train_step(adapter_id, new_state.to_dict()):
                    return None
                self.remember(adapter_id, new_state)
                record = self.store.get_adapter(owner, adapter_id)
                steps = record.train_steps if record is not None else 0
                return StepReport(steps, True, stats, *_spread(rewards))

        report = await run_in_threadpool(apply)
        if report is None:
            raise ApiError(404, f"adapter {adapter_id!r} not found")
        return report


@dataclass(frozen=True)
class TrainGroupInput:
    """A verified RL group's sampled tokens, their log-probabilities and rewards."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    rewards: list[float]


def _spread(rewards: Sequence[float]) -> tuple[float | None, float | None]:
    if not rewards:
        return None, None
    return statistics.fmean(rewards), statistics.pstdev(rewards)
