"""The local tuning service: every endpoint of the tuning API as an ASGI app.

``create_app`` builds a FastAPI app serving ``/v1/tuning/...`` with the spec's JSON. All
set-up happens in ``create_app`` (no lifespan events), so the app also works in-process
through ``httpx.ASGITransport``, which does not run them.

Errors are ``{"error": {"type": ..., "message": ...}}`` with 400 (unreadable body,
image or cursor; tampered rollouts), 401, 404 (unknown ids and other keys' ids alike),
413, 422 (invalid fields, named), 429, 500 and 503.

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
import random
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, TypeVar

import anyio
import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from lightning_moondream.api import wire
from lightning_moondream.api.models import (
    AnyRequest,
    check_groups,
    check_num_rollouts,
    check_rank,
    parse_ground_truth,
    parse_request,
    validation_message,
)
from lightning_moondream.images import DEFAULT_MAX_PIXELS, ImageError, decode_data_url
from lightning_moondream.rewards import ground_truth_reward
from lightning_moondream.server import codec, signing
from lightning_moondream.server.engine import (
    AdapterState,
    Engine,
    Task,
    TrainGroup,
    make_engine,
)
from lightning_moondream.server.faults import (
    DroppedConnection,
    FaultConfig,
    FaultInjector,
    check_latency,
    endpoint_of,
)
from lightning_moondream.server.policy import Decoding
from lightning_moondream.server.store import AdapterRecord, Store, is_adapter_id

PREFIX = "/v1/tuning"
AUTH_HEADER = "X-Moondream-Auth"
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 20, 100
CACHED_ADAPTERS = 64
"""Adapter states kept in memory; others are read from their weight files on use."""

SAMPLE_COUNTS = 65536
"""Requests whose repeat count is kept for sampling seeds (see ``Service.sampling_seed``)."""

_DROP = "lightning_moondream.drop"
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


class _CreateAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(min_length=1, max_length=256)
    rank: StrictInt
    from_checkpoint: StrictStr | None = None


class _Rollouts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter_id: StrictStr
    num_rollouts: StrictInt
    request: dict[str, Any]
    ground_truth: dict[str, Any] | None = None


class _TrainStep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter_id: StrictStr
    groups: list[Any]


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": seq}).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> int:
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
            if scope.get(_DROP):
                return
            if message["type"] == "http.response.start":
                await _sleep_until(answer_at)
            await send(message)

        await super().__call__(scope, receive, held_send)
        if scope.get(_DROP):
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
    ) -> None:
        self.store = store
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
        return owner

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
        body = await self.json_body(request)
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise ApiError(422, validation_message(exc, "")) from exc

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

    def parse_request(self, raw: Any, where: str) -> AnyRequest:
        """Validate a skill request exactly as the client does, image included.

        Raises:
            ApiError: 400 for an unreadable image, 422 for any other invalid field.
        """
        if not isinstance(raw, dict):
            raise ApiError(422, f"{where}: must be an object")
        try:
            return parse_request(raw, wire=True, max_pixels=self.max_pixels)
        except ValidationError as exc:
            # An image that is there but unreadable is a bad payload (400), not a bad field.
            unreadable_image = all(
                item["loc"][-1:] == ("image_url",) and item["type"] == "value_error"
                for item in exc.errors()
            )
            raise ApiError(
                400 if unreadable_image else 422, validation_message(exc, where)
            ) from exc

    def task(self, request: AnyRequest) -> Task:
        """Decode a validated request into what the engine samples for."""
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


def create_app(
    *,
    data_dir: str | Path | None = None,
    api_keys: Collection[str] | None = None,
    policy: str = "reference",
    latency: Mapping[str, float] | None = None,
    faults: FaultConfig | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    seed: int = 0,
) -> FastAPI:
    """Build the local tuning service.

    Args:
        data_dir: Where adapters, checkpoints and the signing secret live; a temporary
            directory (removed with the app) if ``None``.
        api_keys: Accepted ``X-Moondream-Auth`` keys; ``None`` accepts any non-empty
            key, each key seeing only its own adapters.
        policy: ``"reference"`` (learning torch policy) or ``"constant"`` (no compute).
        latency: Least seconds an answer takes, per endpoint group (``"adapters"``,
            ``"checkpoints"``, ``"rollouts"``, ``"train_step"``); the service's own
            handling runs within it.
        faults: Failures to inject (none by default).
        max_body_bytes: Largest request body accepted (413 above).
        max_pixels: Largest decoded image accepted, in pixels (400 above).
        seed: Seed of sampling and adapter initialization order.

    Raises:
        ValueError: For an unknown policy, latency endpoint or empty key set.
    """
    if api_keys is not None:
        api_keys = [key for key in api_keys if key]
        if not api_keys:
            raise ValueError("api_keys is empty: give at least one key, or None to accept any key")
    app = TuningApp(title="lightning_moondream local tuning service", docs_url=None, redoc_url=None)
    app.latency = check_latency(latency)
    app.faults = FaultInjector(faults or FaultConfig())
    if data_dir is None:
        temporary = TemporaryDirectory(prefix="lightning-moondream-")
        # The directory lives as long as the app object does.
        app.state.temporary_dir = temporary
        data_dir = temporary.name
    service = Service(
        Store(Path(data_dir)),
        make_engine(policy),
        api_keys,
        app.faults,
        max_body_bytes,
        max_pixels,
        seed,
    )
    app.state.service = service
    _install_error_handlers(app)
    _install_adapter_routes(app, service)
    _install_training_routes(app, service)
    return app


def close_app(app: FastAPI) -> None:
    """Release what ``create_app`` opened: the database, and a temporary data folder."""
    app.state.service.store.close()
    temporary = getattr(app.state, "temporary_dir", None)
    if temporary is not None:
        temporary.cleanup()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))


def _install_adapter_routes(app: FastAPI, service: Service) -> None:
    store = service.store

    @app.post(f"{PREFIX}/adapters")
    async def create_adapter(request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        body = await service.parse_body(request, _CreateAdapter)
        try:
            check_rank(body.rank)
        except ValueError as exc:
            raise ApiError(422, f"rank: {exc}") from exc
        if body.from_checkpoint is not None:
            checkpoint = store.get_checkpoint(owner, body.from_checkpoint)
            if checkpoint is None:
                raise ApiError(
                    404, f"from_checkpoint: checkpoint {body.from_checkpoint!r} not found"
                )
            path = store.checkpoint_path(checkpoint.checkpoint_id)
            state = AdapterState.from_dict(await run_in_threadpool(store.load_state, path))
            if state.rank != body.rank:
                raise ApiError(
                    422,
                    f"rank: {body.rank} differs from the rank {state.rank} of checkpoint {body.from_checkpoint}",
                )
        else:
            state = service.engine.new_adapter(body.rank, service.seed())
        record = await run_in_threadpool(
            store.create_adapter, owner, body.name, body.rank, state.to_dict()
        )
        return {"adapter_id": record.adapter_id}

    @app.get(f"{PREFIX}/adapters")
    async def list_adapters(request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        limit = _page_limit(request)
        after = _decode_cursor(request.query_params.get("cursor"))
        records, more = store.list_adapters(owner, limit, after)
        return {
            "adapters": [record.to_json() for record in records],
            "next_cursor": _encode_cursor(records[-1].seq) if more else None,
        }

    @app.get(f"{PREFIX}/adapters/{{adapter_id}}")
    async def get_adapter(adapter_id: str, request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)

        def read() -> AdapterRecord:
            service.get_adapter_or_404(owner, adapter_id)
            # A client that gave up waiting for a train step reads train_steps back to
            # learn whether it was applied: a step still running must be counted, so the
            # read waits for it instead of racing it.
            with service.train_lock(adapter_id):
                return service.get_adapter_or_404(owner, adapter_id)

        return (await run_in_threadpool(read)).to_json()

    @app.delete(f"{PREFIX}/adapters/{{adapter_id}}")
    async def delete_adapter(adapter_id: str, request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)

        def delete() -> bool:
            # Wait for a running train step, so it cannot write the files back afterwards.
            with service.train_lock(adapter_id):
                return store.delete_adapter(owner, adapter_id)

        if not is_adapter_id(adapter_id) or not await run_in_threadpool(delete):
            raise ApiError(404, f"adapter {adapter_id!r} not found")
        service.forget(adapter_id)
        return {}

    @app.post(f"{PREFIX}/adapters/{{adapter_id}}/checkpoint")
    async def save_checkpoint(adapter_id: str, request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        service.get_adapter_or_404(owner, adapter_id)
        state = await run_in_threadpool(service.state, adapter_id)
        record = await run_in_threadpool(
            store.create_checkpoint, owner, adapter_id, state.to_dict()
        )
        return record.to_json()

    @app.get(f"{PREFIX}/adapters/{{adapter_id}}/checkpoints")
    async def list_checkpoints(adapter_id: str, request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        limit = _page_limit(request)
        after = _decode_cursor(request.query_params.get("cursor"))
        service.get_adapter_or_404(owner, adapter_id)
        records, more = store.list_checkpoints(owner, adapter_id, limit, after)
        return {
            "checkpoints": [record.to_json() for record in records],
            "next_cursor": _encode_cursor(records[-1].seq) if more else None,
        }

    @app.delete(f"{PREFIX}/adapters/{{adapter_id}}/checkpoints/{{checkpoint_id:path}}")
    async def delete_checkpoint(
        adapter_id: str, checkpoint_id: str, request: Request
    ) -> dict[str, Any]:
        owner = service.authenticate(request)
        # Short form "chk_001", or the full id "adapter/chk_001" (its slash raw or %2F).
        full_id = checkpoint_id if "/" in checkpoint_id else f"{adapter_id}/{checkpoint_id}"
        if not full_id.startswith(f"{adapter_id}/") or not store.delete_checkpoint(owner, full_id):
            raise ApiError(404, f"checkpoint {full_id!r} not found")
        return {}


def _rollout_fields(rollout: dict[str, Any], where: str) -> tuple[list[int], list[float], str]:
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


def _install_training_routes(app: FastAPI, service: Service) -> None:
    store = service.store

    @app.post(f"{PREFIX}/rollouts")
    async def rollouts(request: Request) -> Response:
        owner = service.authenticate(request)
        body = await service.parse_body(request, _Rollouts)
        try:
            check_num_rollouts(body.num_rollouts)
        except ValueError as exc:
            raise ApiError(422, f"num_rollouts: {exc}") from exc
        parsed = service.parse_request(body.request, "request")
        try:
            ground_truth = parse_ground_truth(parsed.skill, body.ground_truth)
        except ValidationError as exc:
            raise ApiError(422, validation_message(exc, "ground_truth")) from exc
        except ValueError as exc:
            raise ApiError(422, f"ground_truth: {exc}") from exc
        record = service.get_adapter_or_404(owner, body.adapter_id)
        digest = signing.request_digest(body.request)
        seed = service.sampling_seed(record, digest)

        def sample() -> list[dict[str, Any]]:
            state = service.state(body.adapter_id)
            task = service.task(parsed)
            generator = torch.Generator().manual_seed(seed)
            samples = service.engine.sample(state, task, body.num_rollouts, generator)
            return [
                {
                    "skill": parsed.skill,
                    "output": codec.decode(parsed.skill, sample.tokens),
                    "answer_tokens": sample.tokens,
                    "coords": codec.coordinates(parsed.skill, sample.tokens),
                    "logprobs": sample.logprobs,
                    "signature": signing.sign_rollout(
                        store.secret, body.adapter_id, digest, sample.tokens, sample.logprobs
                    ),
                }
                for sample in samples
            ]

        items = await run_in_threadpool(sample)
        rewards = None
        if ground_truth is not None:
            truth = ground_truth.model_dump(mode="json", exclude_none=True)
            rewards = [ground_truth_reward(parsed.skill, item["output"], truth) for item in items]
        # Written directly: FastAPI's encoder walks every value in Python, about 2 ms
        # for an answer of 16 rollouts.
        answer = {"request": body.request, "rollouts": items, "rewards": rewards}
        return Response(wire.dumps(answer), media_type="application/json")

    @app.post(f"{PREFIX}/train_step")
    async def train_step(request: Request) -> dict[str, Any]:
        owner = service.authenticate(request)
        body = await service.parse_body(request, _TrainStep)
        try:
            groups = check_groups(body.groups)
        except ValueError as exc:
            raise ApiError(422, str(exc)) from exc
        service.get_adapter_or_404(owner, body.adapter_id)
        verified: list[tuple[AnyRequest, list[list[int]], list[list[float]], list[float]]] = []
        for index, group in enumerate(groups):
            parsed = service.parse_request(group["request"], f"groups[{index}].request")
            digest = signing.request_digest(group["request"])
            all_tokens, all_logprobs = [], []
            for number, rollout in enumerate(group["rollouts"]):
                where = f"groups[{index}].rollouts[{number}]"
                tokens, logprobs, signature = _rollout_fields(rollout, where)
                if rollout.get("skill") != parsed.skill or not signing.verify_rollout(
                    store.secret, body.adapter_id, digest, tokens, logprobs, signature
                ):
                    raise ApiError(
                        400,
                        f"{where}: signature mismatch; the rollout was changed, or was sampled for "
                        "another adapter or request",
                    )
                all_tokens.append(tokens)
                all_logprobs.append(logprobs)
            verified.append((parsed, all_tokens, all_logprobs, group["rewards"]))

        def apply() -> bool:
            with service.train_lock(body.adapter_id):
                state = service.state(body.adapter_id)
                train_groups = [
                    TrainGroup(service.task(parsed), tokens, logprobs, rewards)
                    for parsed, tokens, logprobs, rewards in verified
                ]
                new_state = service.engine.train(state, train_groups)
                if not store.record_train_step(body.adapter_id, new_state.to_dict()):
                    return False
                service.remember(body.adapter_id, new_state)
                return True

        if not await run_in_threadpool(apply):
            raise ApiError(404, f"adapter {body.adapter_id!r} not found")
        failure = service.faults.after_train_step()
        if failure == "drop":
            request.scope[_DROP] = True
        elif failure is not None:
            raise ApiError(500, "injected failure after the train step was applied")
        return {}
