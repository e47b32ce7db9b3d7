"""The tuning API client over an injected ``httpx.MockTransport``: no network, no sleeping."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from PIL import Image
from support import Handler, Recorder

from lightning_moondream.api import (
    AmbiguousRequestError,
    APIConnectionError,
    APITimeoutError,
    AsyncTuningClient,
    AuthenticationError,
    ConflictError,
    DetectRequest,
    InvalidRequestError,
    MissingAPIKeyError,
    NotFoundError,
    RateLimitError,
    RetryPolicy,
    RolloutCall,
    ServerError,
    TuningClient,
)
from lightning_moondream.api.limiter import RateLimiter
from lightning_moondream.api.retry import parse_retry_after

KEY = "sk-test-5ecret-key-value"
BASE = "https://tuning.example/v1/tuning"
BOX = {"x_min": 0.1, "y_min": 0.2, "x_max": 0.4, "y_max": 0.6}
DATA_URL = "data:image/jpeg;base64,/9j/AAAA"


def options(recorder: Recorder, http: type[httpx.Client | httpx.AsyncClient]) -> dict[str, Any]:
    """Arguments of a test client answered by ``recorder``, speaking ``/adapters``."""
    return {
        "api_key": KEY,
        "base_url": BASE,
        "dialect": "adapters",
        "http_client": http(transport=httpx.MockTransport(recorder)),
        "rate_limiter": RateLimiter(),  # the key's pace in this process: none of other tests'
    }


def make_client(handler: Handler, **kwargs: Any) -> tuple[TuningClient, Recorder, list[float]]:
    recorder = Recorder(handler)
    client = TuningClient(**options(recorder, httpx.Client), **kwargs)
    slept: list[float] = []
    client._sleep = slept.append
    client.retry_policy.rng = random.Random(0)
    return client, recorder, slept


def make_async_client(handler: Handler) -> tuple[AsyncTuningClient, Recorder, list[float]]:
    recorder = Recorder(handler)
    client = AsyncTuningClient(**options(recorder, httpx.AsyncClient))
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    client._sleep = fake_sleep
    return client, recorder, slept


def ok(body: Any = None, status: int = 200) -> Handler:
    return lambda request: httpx.Response(status, json={} if body is None else body)


ROLLOUT = {
    "skill": "detect",
    "output": {"boxes": [BOX]},
    "answer_tokens": [3, 1, 4],
    "coords": [[0.1, 0.2]],
    "future_field": {"nested": [1, None, "x"]},
}


def rollouts_answer(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    return httpx.Response(
        200,
        json={
            "request": body["request"],
            "rollouts": [ROLLOUT] * body["num_rollouts"],
            "rewards": [0.5] * body["num_rollouts"] if "ground_truth" in body else None,
        },
    )


# Wire format ---------------------------------------------------------------------------


def test_every_endpoint_sends_the_spec_wire_format() -> None:
    answers = {
        ("POST", "/v1/tuning/adapters"): {"adapter_id": "abc123"},
        ("GET", "/v1/tuning/adapters"): {"adapters": [], "next_cursor": None},
        ("GET", "/v1/tuning/adapters/abc123"): {
            "adapter_id": "abc123",
            "name": "cars",
            "rank": 32,
            "created_at": "2025-01-15T10:00:00Z",
        },
        ("DELETE", "/v1/tuning/adapters/abc123"): {},
        ("POST", "/v1/tuning/adapters/abc123/checkpoint"): {
            "checkpoint_id": "abc123/chk_001",
            "created_at": "2025-01-15T10:30:00Z",
        },
        ("GET", "/v1/tuning/adapters/abc123/checkpoints"): {"checkpoints": [], "next_cursor": None},
        ("DELETE", "/v1/tuning/adapters/abc123/checkpoints/chk_001"): {},
        ("POST", "/v1/tuning/train_step"): {},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/tuning/rollouts":
            return rollouts_answer(request)
        return httpx.Response(200, json=answers[(request.method, request.url.path)])

    client, recorder, _ = make_client(handler)
    adapter = client.adapters.create("cars", 32, from_checkpoint="old/chk_002")
    assert (adapter.adapter_id, adapter.name, adapter.rank) == ("abc123", "cars", 32)
    client.adapters.list(limit=5, cursor="c1")
    assert client.adapters.get("abc123").created_at is not None
    client.adapters.delete("abc123")
    checkpoint = client.checkpoints.save("abc123")
    assert checkpoint.checkpoint_id == "abc123/chk_001"
    assert checkpoint.adapter_id == "abc123"
    client.checkpoints.list("abc123", limit=7)
    client.checkpoints.delete("abc123/chk_001")
    response = client.rollouts(
        "abc123",
        {"skill": "detect", "object": "car", "image_url": DATA_URL, "settings": {"max_objects": 3}},
        num_rollouts=2,
        ground_truth={"boxes": [BOX]},
    )
    client.train_step("abc123", [response.to_group()])

    sent = [(r.method, r.url.path, dict(r.url.params)) for r in recorder.requests]
    assert sent == [
        ("POST", "/v1/tuning/adapters", {}),
        ("GET", "/v1/tuning/adapters", {"limit": "5", "cursor": "c1"}),
        ("GET", "/v1/tuning/adapters/abc123", {}),
        ("DELETE", "/v1/tuning/adapters/abc123", {}),
        ("POST", "/v1/tuning/adapters/abc123/checkpoint", {}),
        ("GET", "/v1/tuning/adapters/abc123/checkpoints", {"limit": "7"}),
        ("DELETE", "/v1/tuning/adapters/abc123/checkpoints/chk_001", {}),
        ("POST", "/v1/tuning/rollouts", {}),
        ("POST", "/v1/tuning/train_step", {}),
    ]
    assert all(r.headers["X-Moondream-Auth"] == KEY for r in recorder.requests)
    bodies = recorder.bodies()
    assert bodies[0] == {"name": "cars", "rank": 32, "from_checkpoint": "old/chk_002"}
    assert recorder.requests[4].content == b""
    assert bodies[7] == {
        "adapter_id": "abc123",
        "num_rollouts": 2,
        "request": {
            "skill": "detect",
            "object": "car",
            "image_url": DATA_URL,
            # Only the settings given: the service's defaults apply to the others.
            "settings": {"max_objects": 3},
        },
        "ground_truth": {"boxes": [BOX]},
    }
    assert bodies[8]["adapter_id"] == "abc123"
    assert bodies[8]["groups"][0]["rewards"] == [0.5, 0.5]


def test_opaque_rollout_fields_go_back_to_train_step_unchanged() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return (
            rollouts_answer(request)
            if request.url.path.endswith("/rollouts")
            else httpx.Response(200, json={})
        )

    client, recorder, _ = make_client(handler)
    response = client.rollouts(
        "a1", DetectRequest(object="car", image_url=DATA_URL), num_rollouts=3
    )
    assert response.rewards is None
    assert [box.as_tuple() for box in response.rollouts[0].boxes] == [(0.1, 0.2, 0.4, 0.6)]
    client.train_step("a1", [response.to_group([1.0, 0.0, 0.5])])
    group = recorder.bodies()[1]["groups"][0]
    assert group["rollouts"] == [ROLLOUT] * 3
    assert group["request"] == recorder.bodies()[0]["request"]
    assert group["rewards"] == [1.0, 0.0, 0.5]


def test_request_encodes_a_pil_image_once_into_a_jpeg_data_url() -> None:
    client, recorder, _ = make_client(rollouts_answer)
    image = Image.new("RGBA", (8, 6), (255, 0, 0, 128))
    client.rollouts("a1", {"skill": "point", "object": "dot", "image_url": image}, num_rollouts=1)
    sent = recorder.bodies()[0]["request"]["image_url"]
    assert sent.startswith("data:image/jpeg;base64,")
    assert client.usage.images_sent == 1


def test_iter_walks_every_page() -> None:
    pages = {
        None: {
            "adapters": [{"adapter_id": "a", "name": "a", "rank": 16, "created_at": "t"}],
            "next_cursor": "p2",
        },
        "p2": {
            "adapters": [{"adapter_id": "b", "name": "b", "rank": 16, "created_at": "t"}],
            "next_cursor": "p3",
        },
        "p3": {
            "adapters": [{"adapter_id": "c", "name": "c", "rank": 32, "created_at": "t"}],
            "next_cursor": None,
        },
    }
    client, recorder, _ = make_client(
        lambda r: httpx.Response(200, json=pages[r.url.params.get("cursor")])
    )
    assert [adapter.adapter_id for adapter in client.adapters.iter(limit=1)] == ["a", "b", "c"]
    assert [r.url.params.get("cursor") for r in recorder.requests] == [None, "p2", "p3"]

    async_client, _, _ = make_async_client(
        lambda r: httpx.Response(200, json=pages[r.url.params.get("cursor")])
    )

    async def collect() -> list[str]:
        return [adapter.adapter_id async for adapter in async_client.adapters.iter(limit=1)]

    assert asyncio.run(collect()) == ["a", "b", "c"]


def test_checkpoint_iter_walks_every_page() -> None:
    pages = {
        None: {
            "checkpoints": [{"checkpoint_id": "a/chk_1", "created_at": "t"}],
            "next_cursor": "n",
        },
        "n": {"checkpoints": [{"checkpoint_id": "a/chk_2", "created_at": "t"}]},
    }
    client, _, _ = make_client(
        lambda r: httpx.Response(200, json=pages[r.url.params.get("cursor")])
    )
    assert [c.checkpoint_id for c in client.checkpoints.iter("a")] == ["a/chk_1", "a/chk_2"]


# Validation before sending --------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda c: c.adapters.create("x", 8), "rank must be 16 or 32"),
        (lambda c: c.adapters.create("", 16), "name"),
        (lambda c: c.adapters.create("x", 16, from_checkpoint="nochk"), "adapter_id/checkpoint_id"),
        (lambda c: c.adapters.list(limit=0), "limit"),
        (lambda c: c.checkpoints.delete("chk_001"), "adapter_id/checkpoint_id"),
        (lambda c: c.rollouts("a", {"skill": "detect", "object": "car"}, 2), "image_url"),
        (
            lambda c: c.rollouts("a", {"skill": "point", "object": "x", "image_url": DATA_URL}, 17),
            "num_rollouts",
        ),
        (lambda c: c.rollouts("a", {"skill": "query", "question": "hi"}, 0), "num_rollouts"),
        (lambda c: c.rollouts("a", {"skill": "dance", "question": "hi"}, 1), "skill"),
        (
            lambda c: c.rollouts(
                "a", {"skill": "query", "question": "q", "settings": {"max_objects": 2}}, 1
            ),
            "max_objects is only valid for detect",
        ),
        (
            lambda c: c.rollouts("a", {"skill": "query", "question": "q"}, 1, {"boxes": []}),
            "only accepted for point and detect",
        ),
        (
            lambda c: c.rollouts(
                "a",
                {"skill": "detect", "object": "car", "image_url": DATA_URL},
                1,
                {"boxes": [{"x_min": 0.5, "y_min": 0.1, "x_max": 0.2, "y_max": 0.3}]},
            ),
            "x_min (0.5) must be less than x_max",
        ),
        (
            lambda c: c.rollouts(
                "a",
                {"skill": "point", "object": "x", "image_url": DATA_URL},
                1,
                {"points": [{"x": 1.5, "y": 0}]},
            ),
            "ground_truth.points.0.x",
        ),
        (
            lambda c: c.rollouts(
                "a", {"skill": "point", "object": "x", "image_url": "/no/such.png"}, 1
            ),
            "/no/such.png",
        ),
        (lambda c: c.train_step("a", []), "non-empty list"),
        (
            lambda c: c.train_step(
                "a", [{"request": {"skill": "detect"}, "rollouts": [{}], "rewards": [1.0, 2.0]}]
            ),
            "groups[0]: 2 rewards for 1 rollouts",
        ),
        (
            lambda c: c.train_step(
                "a", [{"request": {"skill": "detect"}, "rollouts": [{}], "rewards": [float("nan")]}]
            ),
            "rewards[0] is not finite",
        ),
    ],
)
def test_invalid_input_is_refused_before_sending(
    call: Callable[[TuningClient], Any], fragment: str
) -> None:
    client, recorder, _ = make_client(ok())
    with pytest.raises(InvalidRequestError) as caught:
        call(client)
    assert fragment in str(caught.value)
    assert recorder.requests == []


def test_ground_truth_errors_name_the_field() -> None:
    client, _, _ = make_client(ok())
    with pytest.raises(InvalidRequestError, match=r"points\.0\.x"):
        client.rollouts(
            "a",
            {"skill": "point", "object": "x", "image_url": DATA_URL},
            1,
            {"points": [{"x": 2, "y": 0}]},
        )


def test_missing_key_names_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOONDREAM_API_KEY", raising=False)
    with pytest.raises(MissingAPIKeyError, match="MOONDREAM_API_KEY"):
        TuningClient(http_client=httpx.Client(transport=httpx.MockTransport(ok())))
    monkeypatch.setenv("MOONDREAM_API_KEY", KEY)
    monkeypatch.setenv("MOONDREAM_TUNING_URL", "http://127.0.0.1:9/v1/tuning/")
    client = TuningClient(http_client=httpx.Client(transport=httpx.MockTransport(ok())))
    assert client.base_url == "http://127.0.0.1:9/v1/tuning"


# Errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, InvalidRequestError),
        (401, AuthenticationError),
        (403, AuthenticationError),
        (404, NotFoundError),
        (409, ConflictError),
        (413, InvalidRequestError),
        (422, InvalidRequestError),
        (429, RateLimitError),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
    ],
)
def test_each_status_maps_to_its_error(status: int, error_class: type[Exception]) -> None:
    body = {"error": {"type": "x", "message": f"went wrong {status}"}}
    client, _, _ = make_client(
        lambda r: httpx.Response(status, json=body, headers={"x-request-id": "req-42"}),
        max_retries=0,
    )
    with pytest.raises(error_class) as caught:
        client.adapters.get("abc")
    assert caught.value.status_code == status
    assert caught.value.request_id == "req-42"
    assert f"went wrong {status}" in str(caught.value)
    assert "GET /adapters/abc" in str(caught.value)


def test_a_malformed_success_answer_is_a_server_error() -> None:
    client, _, _ = make_client(lambda r: httpx.Response(200, content=b"<html>"))
    with pytest.raises(ServerError, match="not the API's JSON"):
        client.adapters.get("abc")


# Retries --------------------------------------------------------------------------------


def failing(
    times: int, failure: Callable[[httpx.Request], httpx.Response], then: Handler
) -> Handler:
    count = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        count["n"] += 1
        return failure(request) if count["n"] <= times else then(request)

    return handler


def status(code: int, **headers: str) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(
        code, json={"error": {"message": "busy"}}, headers=headers
    )


def raise_(error_class: type[httpx.TransportError]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error_class("boom", request=request)

    return handler


ADAPTER = {"adapter_id": "a", "name": "a", "rank": 16, "created_at": "t"}


@pytest.mark.parametrize("code", [408, 425, 429, 500, 502, 503, 504])
def test_safe_calls_retry_with_jittered_backoff(code: int) -> None:
    client, recorder, slept = make_client(failing(3, status(code), ok(ADAPTER)))
    assert client.adapters.get("a").adapter_id == "a"
    assert len(recorder.requests) == 4
    caps = [0.5, 1.0, 2.0]
    assert all(0 <= s <= cap for s, cap in zip(slept, caps, strict=False))
    # After 429s the key's pace, learnt from them, may hold the last retry a little more.
    assert len(slept) == 3 or (code == 429 and len(slept) == 4)
    assert client.usage.retries == 3


@pytest.mark.parametrize(
    "error", [httpx.ConnectError, httpx.ReadTimeout, httpx.RemoteProtocolError]
)
def test_safe_calls_retry_transport_errors(error: type[httpx.TransportError]) -> None:
    client, recorder, _ = make_client(failing(1, raise_(error), ok(ADAPTER)))
    assert client.adapters.get("a").adapter_id == "a"
    assert len(recorder.requests) == 2


def test_backoff_is_capped() -> None:
    policy = RetryPolicy(max_retries=20, rng=random.Random(1))
    assert all(policy.backoff(attempt) <= 30.0 for attempt in range(20))
    assert max(policy.backoff(15) for _ in range(200)) > 15.0


def test_retry_after_seconds_is_honoured() -> None:
    client, _, slept = make_client(failing(1, status(429, **{"Retry-After": "7"}), ok(ADAPTER)))
    client.adapters.get("a")
    assert slept == [7.0]


def test_retry_after_http_date_is_honoured() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    header = format_datetime(now + timedelta(seconds=12), usegmt=True)
    assert parse_retry_after(header, now=now) == 12.0
    assert parse_retry_after("soon", now=now) is None
    assert (
        parse_retry_after(format_datetime(now - timedelta(seconds=5), usegmt=True), now=now) == 0.0
    )
    client, _, slept = make_client(failing(1, status(503, **{"Retry-After": header}), ok(ADAPTER)))
    client.adapters.get("a")
    assert len(slept) == 1 and 0.0 <= slept[0] <= 12.0


def test_retries_stop_after_max_retries() -> None:
    client, recorder, slept = make_client(status(503), max_retries=2)
    with pytest.raises(ServerError):
        client.adapters.get("a")
    assert len(recorder.requests) == 3 and len(slept) == 2
    assert client.usage.failures == 1


GROUP = {
    "request": {"skill": "query", "question": "q"},
    "rollouts": [{"output": {"answer": "a"}}],
    "rewards": [1.0],
}


@pytest.mark.parametrize("code", [500, 502, 504])
def test_train_step_is_not_retried_on_server_errors(code: int) -> None:
    client, recorder, slept = make_client(status(code))
    with pytest.raises(AmbiguousRequestError, match="may or may not have been applied") as caught:
        client.train_step("a", [GROUP])
    assert len(recorder.requests) == 1 and slept == []
    assert isinstance(caught.value.cause, ServerError)
    assert caught.value.status_code == code


@pytest.mark.parametrize("error", [httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError])
def test_train_step_is_not_retried_when_the_answer_is_lost(
    error: type[httpx.TransportError],
) -> None:
    client, recorder, _ = make_client(raise_(error))
    with pytest.raises(AmbiguousRequestError, match="may or may not have been applied") as caught:
        client.train_step("a", [GROUP])
    assert len(recorder.requests) == 1
    expected = APITimeoutError if error is httpx.ReadTimeout else APIConnectionError
    assert isinstance(caught.value.cause, expected)


@pytest.mark.parametrize(
    "failure", [status(429, **{"Retry-After": "1"}), status(503), raise_(httpx.ConnectError)]
)
def test_train_step_is_retried_where_the_server_provably_did_not_act(
    failure: Callable[[httpx.Request], httpx.Response],
) -> None:
    client, recorder, _ = make_client(failing(2, failure, ok()))
    client.train_step("a", [GROUP])
    assert len(recorder.requests) == 3
    assert client.usage.train_steps == 1


def test_state_changing_calls_share_the_train_step_rule() -> None:
    client, recorder, _ = make_client(status(500), max_retries=0)
    with pytest.raises(AmbiguousRequestError, match="looking for the adapter named 'x' failed"):
        client.adapters.create("x", 16)
    with pytest.raises(AmbiguousRequestError, match="listing the checkpoints of a failed"):
        client.checkpoints.save("a")
    # Each call is sent once, then looked up once; neither is repeated.
    assert [(r.method, r.url.path.removeprefix("/v1/tuning")) for r in recorder.requests] == [
        ("POST", "/adapters"),
        ("GET", "/adapters"),
        ("POST", "/adapters/a/checkpoint"),
        ("GET", "/adapters/a/checkpoints"),
    ]


def test_a_refused_train_step_is_not_ambiguous() -> None:
    client, _, _ = make_client(status(422))
    with pytest.raises(InvalidRequestError):
        client.train_step("a", [GROUP])


def test_async_client_retries_the_same_way() -> None:
    client, recorder, slept = make_async_client(failing(2, status(503), ok(ADAPTER)))

    async def run() -> str:
        async with client:
            return (await client.adapters.get("a")).adapter_id

    assert asyncio.run(run()) == "a"
    assert len(recorder.requests) == 3 and len(slept) == 2

    client, recorder, _ = make_async_client(status(502))

    async def step() -> None:
        await client.train_step("a", [GROUP])

    with pytest.raises(AmbiguousRequestError):
        asyncio.run(step())
    assert len(recorder.requests) == 1


# Concurrency -----------------------------------------------------------------------------


def test_rollouts_many_bounds_concurrency_and_keeps_input_order() -> None:
    in_flight = {"now": 0, "max": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])
        question = json.loads(request.content)["request"]["question"]
        # Later calls answer first, so input order must be restored by the helper.
        await asyncio.sleep(0.001 * (20 - int(question)))
        in_flight["now"] -= 1
        return rollouts_answer(request)

    client = AsyncTuningClient(
        api_key=KEY,
        base_url=BASE,
        dialect="adapters",
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        rate_limiter=RateLimiter(),  # no rate to keep: only max_concurrency bounds it
    )
    calls = [RolloutCall("a", {"skill": "query", "question": str(i)}, 1) for i in range(20)]
    responses = asyncio.run(client.rollouts_many(calls, max_concurrency=3))
    assert [r.request["question"] for r in responses] == [str(i) for i in range(20)]
    assert in_flight["max"] == 3


def test_rollouts_many_validates_everything_before_sending() -> None:
    client, recorder, _ = make_client(rollouts_answer)
    calls = [
        RolloutCall("a", {"skill": "query", "question": "ok"}, 1),
        RolloutCall("a", {"skill": "query"}, 1),
    ]
    with pytest.raises(InvalidRequestError, match="question"):
        client.rollouts_many(calls)
    assert recorder.requests == []
    good = [RolloutCall("a", {"skill": "query", "question": str(i)}, 2) for i in range(5)]
    assert [r.request["question"] for r in client.rollouts_many(good, max_concurrency=2)] == list(
        "01234"
    )


def test_rollouts_many_fails_the_whole_batch_on_one_failure() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["request"]["question"] == "3":
            return httpx.Response(400, json={"error": {"message": "bad question"}})
        return rollouts_answer(request)

    client, _, _ = make_client(handler)
    calls = [RolloutCall("a", {"skill": "query", "question": str(i)}, 1) for i in range(6)]
    with pytest.raises(InvalidRequestError, match="bad question"):
        client.rollouts_many(calls)


# Secrets --------------------------------------------------------------------------------


def test_the_key_never_shows_in_reprs_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    echo = {"error": {"message": f"bad key {KEY}"}}
    client, _, _ = make_client(lambda r: httpx.Response(401, json=echo), max_retries=0)
    with pytest.raises(AuthenticationError) as caught:
        client.adapters.list()
    texts = [repr(client), str(client.__dict__), str(caught.value), repr(caught.value), caplog.text]
    assert all(KEY not in text for text in texts)
    assert "**********" in str(caught.value)

    client, _, _ = make_client(raise_(httpx.ConnectError), max_retries=1)
    with pytest.raises(APIConnectionError) as connection_error:
        client.adapters.list()
    assert KEY not in str(connection_error.value) and KEY not in caplog.text


def test_a_success_without_json_leaves_a_train_step_ambiguous() -> None:
    client, recorder, _ = make_client(lambda r: httpx.Response(200, content=b"<html>ok</html>"))
    with pytest.raises(AmbiguousRequestError, match="may or may not have been applied"):
        client.train_step("a", [GROUP])
    assert len(recorder.requests) == 1


def test_a_key_too_short_to_be_secret_does_not_mangle_messages() -> None:
    recorder = Recorder(
        lambda r: httpx.Response(404, json={"error": {"message": "no local checkpoint"}})
    )
    client = TuningClient(
        api_key="local",
        base_url=BASE,
        dialect="adapters",
        http_client=httpx.Client(transport=httpx.MockTransport(recorder)),
    )
    with pytest.raises(NotFoundError, match="no local checkpoint"):
        client.adapters.get("a")


@pytest.mark.parametrize(
    ("error", "expected"),
    [(httpx.DecodingError, ServerError), (httpx.UnsupportedProtocol, APIConnectionError)],
)
def test_failures_that_would_repeat_are_typed_and_not_retried(
    error: type[httpx.RequestError], expected: type[Exception]
) -> None:
    client, recorder, slept = make_client(raise_(error))
    with pytest.raises(expected):
        client.adapters.get("a")
    assert len(recorder.requests) == 1 and slept == []
