"""The inference API client: its wire (the official SDK's), answers, errors, retries, streams."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image
from support import Handler, Recorder, SleepClock, read_request, serving

from lightning_moondream.api import (
    BASE_MODEL,
    DEFAULT_INFERENCE_URL,
    APIConnectionError,
    AsyncInferenceClient,
    AuthenticationError,
    Box,
    CaptionCall,
    DetectCall,
    InferenceClient,
    InferenceModel,
    InvalidRequestError,
    MissingAPIKeyError,
    NotFoundError,
    Point,
    PointCall,
    QueryCall,
    RateLimiter,
    RateLimitError,
    ServerError,
    Settings,
    TuningClient,
    checkpoint_model_id,
    model_id,
    parse_model,
    resolve_inference_url,
)

KEY = "sk-test-5ecret-inference-key"
BASE = "https://inference.example/v1"
CHECKPOINT = "moondream3-preview/ft_01@40"
BOX = {"x_min": 0.1, "y_min": 0.2, "x_max": 0.4, "y_max": 0.6}


def jpeg_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(buffer, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGE = jpeg_data_url()

ANSWERS: dict[str, dict[str, Any]] = {
    "/query": {
        "request_id": "2026-12-03_query_1",
        "answer": "Two cars.",
        "reasoning": {
            "text": "I see two cars.",
            "grounding": [{"start_idx": 6, "end_idx": 14, "points": [[0.2, 0.3], [0.7, 0.4]]}],
        },
    },
    "/detect": {"request_id": "2026-12-03_detect_1", "objects": [BOX]},
    "/point": {"request_id": "2026-12-03_point_1", "points": [{"x": 0.25, "y": 0.75}]},
    "/caption": {
        "caption": "A red square.",
        "metrics": {
            "input_tokens": 735,
            "output_tokens": 45,
            "prefill_time_ms": 43.5,
            "decode_time_ms": 415.3,
            "ttft_ms": 81.9,
        },
        "finish_reason": "stop",
    },
}
STREAM_TEXT = ["Ein ", "großer ", "Hund 🐕", "."]


def sse(chunks: list[str], *, completed: bool = True) -> bytes:
    """An answer streamed as Moondream streams it: one ``data:`` event per chunk."""
    events = [{"chunk": chunk, "completed": False, "request_id": "r"} for chunk in chunks]
    if completed:
        events.append({"chunk": "", "completed": True, "request_id": "r"})
    return b"".join(
        b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n" for event in events
    )


def canned(request: httpx.Request) -> httpx.Response:
    path = request.url.path.removeprefix("/v1")
    if json.loads(request.content).get("stream"):
        return httpx.Response(200, content=sse(STREAM_TEXT))
    return httpx.Response(200, json=ANSWERS[path])


def make_client(
    handler: Handler = canned, **kwargs: Any
) -> tuple[InferenceClient, Recorder, list[float]]:
    recorder = Recorder(handler)
    kwargs.setdefault("base_url", BASE)
    clock = SleepClock()
    # A limiter of its own, on the clock the fake sleep moves: the key's shared one
    # would carry 429s from test to test.
    kwargs.setdefault("rate_limiter", RateLimiter(clock=clock))
    client = InferenceClient(
        api_key=KEY, http_client=httpx.Client(transport=httpx.MockTransport(recorder)), **kwargs
    )
    slept = clock.slept
    client._sleep = clock.sleep
    client.retry_policy.rng = random.Random(0)
    return client, recorder, slept


def make_async_client(
    handler: Any = canned, **kwargs: Any
) -> tuple[AsyncInferenceClient, list[float]]:
    clock = SleepClock()
    kwargs.setdefault("rate_limiter", RateLimiter(clock=clock))
    client = AsyncInferenceClient(
        api_key=KEY,
        base_url=BASE,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        **kwargs,
    )

    client._sleep = clock.async_sleep
    return client, clock.slept


def failing(times: int, failure: Handler, then: Handler = canned) -> Handler:
    count = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        count["n"] += 1
        return failure(request) if count["n"] <= times else then(request)

    return handler


def status(code: int, message: str = "busy", **headers: str) -> Handler:
    return lambda request: httpx.Response(
        code, json={"error": {"message": message}}, headers=headers
    )


# Wire format ---------------------------------------------------------------------------


def test_every_endpoint_sends_the_documented_wire_format() -> None:
    client, recorder, _ = make_client(model=CHECKPOINT)
    client.query(
        IMAGE,
        "How many cars?",
        settings={"temperature": 0.0, "max_tokens": 64},
        reasoning=True,
        spatial_refs=[[0.5, 0.5], [0.1, 0.1, 0.3, 0.4]],
    )
    client.query(None, "What is a moon?", model=BASE_MODEL)
    client.detect(IMAGE, "car", settings=Settings(max_objects=3))
    client.point(IMAGE, "wheel", spatial_refs=[[0.2, 0.8]])
    client.caption(IMAGE, length="short")

    assert [str(r.url) for r in recorder.requests] == [
        f"{BASE}/query",
        f"{BASE}/query",
        f"{BASE}/detect",
        f"{BASE}/point",
        f"{BASE}/caption",
    ]
    assert recorder.bodies() == [
        {
            "question": "How many cars?",
            "image_url": IMAGE,
            "settings": {"temperature": 0.0, "max_tokens": 64},
            "reasoning": True,
            "spatial_refs": [[0.5, 0.5], [0.1, 0.1, 0.3, 0.4]],
            "stream": False,
            "model": CHECKPOINT,
        },
        {"question": "What is a moon?", "stream": False, "model": BASE_MODEL},
        {"image_url": IMAGE, "object": "car", "settings": {"max_objects": 3}, "model": CHECKPOINT},
        {
            "image_url": IMAGE,
            "object": "wheel",
            "spatial_refs": [[0.2, 0.8]],
            "model": CHECKPOINT,
        },
        {"image_url": IMAGE, "length": "short", "stream": False, "model": CHECKPOINT},
    ]
    for request in recorder.requests:
        assert request.method == "POST"
        assert request.headers["X-Moondream-Auth"] == KEY
        assert request.headers["Content-Type"] == "application/json"


def test_a_client_without_a_model_lets_the_server_choose_its_base_model() -> None:
    client, recorder, _ = make_client()
    client.detect(IMAGE, "car")
    assert "model" not in recorder.bodies()[0]


def test_images_are_encoded_from_any_source_the_tuning_client_takes(tmp_path: Any) -> None:
    image = Image.new("RGBA", (20, 10), (0, 128, 255, 128))
    path = tmp_path / "image.png"
    image.save(path)
    client, recorder, _ = make_client()
    client.detect(image, "a")
    client.detect(path, "a")
    client.detect(path.read_bytes(), "a")
    client.detect(str(path), "a")
    urls = [body["image_url"] for body in recorder.bodies()]
    assert all(url.startswith("data:image/jpeg;base64,") for url in urls)
    decoded = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1])))
    assert decoded.size == (20, 10) and decoded.mode == "RGB"
    assert len(set(urls[1:])) == 1
    assert client.usage.images_sent == 4


class SdkRecorder:
    """An inference server on 127.0.0.1 that records requests and gives canned answers.

    Streamed answers are sent a few bytes per write, so chunks and events are split
    across network reads.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body, _ = await read_request(receive)
        data = json.loads(body)
        headers = {name.decode().lower(): value.decode() for name, value in scope["headers"]}
        path = scope["path"].removeprefix("/v1")
        self.requests.append((path, headers, data))
        if data.get("stream"):
            content, media_type = sse(STREAM_TEXT), b"text/event-stream"
            pieces = [content[start : start + 7] for start in range(0, len(content), 7)]
        else:
            content, media_type = json.dumps(ANSWERS[path]).encode(), b"application/json"
            pieces = [content]
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", media_type)],
            }
        )
        for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def test_the_wire_is_what_the_official_sdk_sends_and_reads() -> None:
    moondream = pytest.importorskip("moondream")
    from moondream.types import Base64EncodedImage

    app = SdkRecorder()
    settings = {"temperature": 0.0, "top_p": 0.9, "max_tokens": 64}
    with serving(app) as tuning_url:
        sdk = moondream.vl(
            endpoint=tuning_url.removesuffix("/tuning"), api_key=KEY, model=CHECKPOINT
        )
        image = Base64EncodedImage(image_url=IMAGE)
        sdk_answers = [
            sdk.query(
                image, "How many?", settings=settings, reasoning=True, spatial_refs=[[0.5, 0.5]]
            ),
            sdk.query(question="Why?"),
            sdk.detect(image, "car", settings={"max_objects": 2}),
            sdk.point(image, "wheel", spatial_refs=[[0.1, 0.2, 0.3, 0.4]]),
            sdk.caption(image, length="long"),
            "".join(sdk.query(image, "Stream?", stream=True)["answer"]),
            "".join(sdk.caption(image, stream=True)["caption"]),
        ]
        sdk_requests, app.requests = app.requests, []

        with InferenceClient(api_key=KEY, tuning_url=tuning_url, model=CHECKPOINT) as client:
            ours = [
                client.query(
                    IMAGE, "How many?", settings=settings, reasoning=True, spatial_refs=[[0.5, 0.5]]
                ),
                client.query(None, "Why?"),
                client.detect(IMAGE, "car", settings={"max_objects": 2}),
                client.point(IMAGE, "wheel", spatial_refs=[[0.1, 0.2, 0.3, 0.4]]),
                client.caption(IMAGE, length="long"),
                "".join(client.query_stream(IMAGE, "Stream?")),
                "".join(client.caption_stream(IMAGE)),
            ]
        our_requests = app.requests

    assert [(path, body) for path, _, body in our_requests] == [
        (path, body) for path, _, body in sdk_requests
    ]
    for (_, sdk_headers, _), (_, our_headers, _) in zip(sdk_requests, our_requests, strict=True):
        assert our_headers["x-moondream-auth"] == sdk_headers["x-moondream-auth"] == KEY
        assert our_headers["content-type"] == sdk_headers["content-type"]
    assert sdk_answers[0]["answer"] == ours[0].answer == "Two cars."
    assert sdk_answers[0]["reasoning"] == ours[0].reasoning.model_dump()
    assert sdk_answers[2]["objects"] == [box.model_dump() for box in ours[2].objects]
    assert sdk_answers[3]["points"] == [point.model_dump() for point in ours[3].points]
    assert sdk_answers[4]["caption"] == ours[4].caption
    assert sdk_answers[5] == ours[5] == sdk_answers[6] == ours[6] == "".join(STREAM_TEXT)


def test_the_async_client_sends_and_reads_over_http_what_the_blocking_one_does() -> None:
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
        ("query", (IMAGE, "How many?"), {"reasoning": True, "spatial_refs": [[0.5, 0.5]]}),
        ("detect", (IMAGE, "car"), {"settings": {"max_objects": 2}}),
        ("caption", (IMAGE,), {"length": "long"}),
        ("query_stream", (IMAGE, "Stream?"), {}),
        ("caption_stream", (IMAGE,), {}),
    ]

    async def awaited(url: str) -> list[Any]:
        answers: list[Any] = []
        async with AsyncInferenceClient(api_key=KEY, tuning_url=url, model=CHECKPOINT) as client:
            for name, args, kwargs in calls:
                answer = getattr(client, name)(*args, **kwargs)
                if name.endswith("_stream"):
                    answers.append("".join([chunk async for chunk in answer]))
                else:
                    answers.append(await answer)
        return answers

    app = SdkRecorder()  # streams arrive 7 bytes per write
    with serving(app) as url:
        with InferenceClient(api_key=KEY, tuning_url=url, model=CHECKPOINT) as client:
            blocking = [getattr(client, name)(*args, **kwargs) for name, args, kwargs in calls]
            blocking[-2:] = ["".join(stream) for stream in blocking[-2:]]
        blocking_requests, app.requests = app.requests, []
        answers = asyncio.run(awaited(url))

    assert [(path, body) for path, _, body in app.requests] == [
        (path, body) for path, _, body in blocking_requests
    ]
    assert answers == blocking
    assert answers[-1] == "".join(STREAM_TEXT)


# Answers --------------------------------------------------------------------------------


def test_answers_are_typed() -> None:
    client, _, _ = make_client()
    query = client.query(IMAGE, "How many cars?", reasoning=True)
    assert query.request_id == "2026-12-03_query_1" and query.answer == "Two cars."
    assert query.reasoning is not None and query.reasoning.text == "I see two cars."
    assert query.reasoning.grounding[0].points == [[0.2, 0.3], [0.7, 0.4]]
    detect = client.detect(IMAGE, "car")
    assert detect.objects == [Box(**BOX)] and detect.objects[0].as_tuple() == (0.1, 0.2, 0.4, 0.6)
    assert client.point(IMAGE, "wheel").points == [Point(x=0.25, y=0.75)]
    caption = client.caption(IMAGE)
    assert caption.caption == "A red square." and caption.finish_reason == "stop"
    assert caption.request_id is None
    assert caption.metrics is not None
    assert (caption.metrics.input_tokens, caption.metrics.output_tokens) == (735, 45)
    assert caption.metrics.ttft_ms == 81.9


def test_fields_the_package_does_not_know_are_kept() -> None:
    answer = {"request_id": "r", "answer": "yes", "usage": {"credits": 3}}
    client, _, _ = make_client(lambda request: httpx.Response(200, json=answer))
    assert client.query(None, "Is it?").model_extra == {"usage": {"credits": 3}}


@pytest.mark.parametrize(
    "content",
    [b"<html>busy</html>", b"", json.dumps({"objects": [{"x_min": 0.5}]}).encode()],
)
def test_an_answer_that_is_not_the_apis_json_is_a_server_error(content: bytes) -> None:
    client, recorder, _ = make_client(lambda request: httpx.Response(200, content=content))
    with pytest.raises(ServerError, match="POST /detect answered something that is not"):
        client.detect(IMAGE, "car")
    assert len(recorder.requests) == 1 and client.usage.failures == 1


# Models ---------------------------------------------------------------------------------


def test_a_checkpoint_is_a_model() -> None:
    assert model_id("ft_01", 40) == CHECKPOINT
    assert parse_model(CHECKPOINT) == InferenceModel("moondream3-preview", "ft_01", 40)
    assert str(parse_model(CHECKPOINT)) == CHECKPOINT
    assert parse_model(BASE_MODEL).is_base and not parse_model(CHECKPOINT).is_base
    assert model_id("ft", 2, base="moondream3.1-9B-A2B") == "moondream3.1-9B-A2B/ft@2"


def test_an_adapters_checkpoint_is_a_model_by_its_id() -> None:
    model = "moondream3-preview/0123456789abcdef@chk_002"
    assert parse_model(model) == InferenceModel(
        "moondream3-preview", "0123456789abcdef", checkpoint="chk_002"
    )
    assert str(parse_model(model)) == model
    assert checkpoint_model_id("0123456789abcdef/chk_002") == model
    assert checkpoint_model_id("ft_01@40") == CHECKPOINT
    with pytest.raises(ValueError, match=r"^checkpoint ref must be"):
        checkpoint_model_id("ft_01")


@pytest.mark.parametrize(
    "model",
    [
        "",
        "moondream3-preview/ft_01@chk_",
        "moondream3-preview/ft_01/chk_001",
        "moondream3-preview/",
        "moondream3-preview/ft_01",
        "moondream3-preview/ft_01@",
        "moondream3-preview/ft_01@-1",
        "moondream3-preview/ft_01@two",
        "moondream3-preview/@40",
        "moondream3-preview/a/b@40",
        "moondream3-preview /ft@1",
        "ft_01@40",
    ],
)
def test_a_malformed_model_is_refused_before_sending(model: str) -> None:
    client, recorder, _ = make_client()
    with pytest.raises(InvalidRequestError, match=r"^model must be") as caught:
        client.detect(IMAGE, "car", model=model)
    assert repr(model) in str(caught.value)
    with pytest.raises(InvalidRequestError, match=r"^model must be"):
        InferenceClient(api_key=KEY, base_url=BASE, model=model)
    assert recorder.requests == []


def test_a_bare_checkpoint_ref_is_shown_its_model_id() -> None:
    with pytest.raises(ValueError, match="'moondream3-preview/ft_01@40'"):
        parse_model("ft_01@40")


@pytest.mark.parametrize(
    ("finetune_id", "step", "field"),
    [("ft/1", 3, "finetune_id"), ("", 3, "finetune_id"), ("ft", -1, "step"), ("ft", True, "step")],
)
def test_model_id_refuses_parts_that_cannot_form_one(
    finetune_id: str, step: Any, field: str
) -> None:
    with pytest.raises(ValueError, match=f"^{field} must"):
        model_id(finetune_id, step)


# Bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.query(IMAGE, ""), "query: question:"),
        (
            lambda c: c.query(IMAGE, "q", spatial_refs=[[0.5]]),
            r"query: spatial_refs: .*spatial_refs\[0\]",
        ),
        (
            lambda c: c.point(IMAGE, "a", spatial_refs=[[0.5, 0.5]] * 65),
            "point: spatial_refs holds 65 references; at most 64",
        ),
        (
            lambda c: c.point(IMAGE, "a", settings={"max_objects": 2}),
            "max_objects is only valid for detect",
        ),
        (
            lambda c: c.detect(IMAGE, "a", settings={"temperature": 5}),
            "detect: settings.temperature",
        ),
        (lambda c: c.detect(IMAGE, "a", settings={"colour": 1}), "detect: settings.colour"),
        (
            lambda c: c.caption(IMAGE, length="medium"),
            "caption: length must be one of short, normal, long",
        ),
        (lambda c: c.caption(IMAGE, settings={"max_objects": 2}), "caption: settings.max_objects"),
        (lambda c: c.caption(IMAGE, settings={"top_p": 0}), "caption: settings: top_p"),
        (lambda c: c.detect("missing.jpg", "a"), "image: missing.jpg: cannot read image file"),
        (lambda c: c.query_stream(b"not an image", "q"), "image: <12 bytes>: not a readable image"),
    ],
)
def test_invalid_input_is_refused_before_sending(
    call: Callable[[InferenceClient], Any], message: str
) -> None:
    client, recorder, _ = make_client()
    with pytest.raises(InvalidRequestError, match=message):
        call(client)
    assert recorder.requests == []


# Errors and retries ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        (400, InvalidRequestError),
        (401, AuthenticationError),
        (404, NotFoundError),
        (413, InvalidRequestError),
        (429, RateLimitError),
        (500, ServerError),
        (503, ServerError),
    ],
)
def test_each_status_maps_to_its_error(code: int, error_class: type[Exception]) -> None:
    answer = httpx.Response(
        code,
        json={"error": {"message": f"model {CHECKPOINT} went wrong {code}"}},
        headers={"x-request-id": "req-7"},
    )
    client, _, _ = make_client(lambda request: answer, max_retries=0)
    with pytest.raises(error_class) as caught:
        client.point(IMAGE, "wheel", model=CHECKPOINT)
    assert caught.value.status_code == code
    assert caught.value.request_id == "req-7"
    assert str(caught.value).startswith(
        f"POST /point with model {CHECKPOINT} answered {code}: model {CHECKPOINT} went wrong"
    )


@pytest.mark.parametrize("code", [408, 425, 429, 500, 502, 503, 504])
def test_every_retryable_failure_is_retried_with_backoff(code: int) -> None:
    client, recorder, slept = make_client(failing(3, status(code)))
    assert client.detect(IMAGE, "car").objects == [Box(**BOX)]
    assert len(recorder.requests) == 4
    assert all(0 <= wait <= cap for wait, cap in zip(slept, [0.5, 1.0, 2.0], strict=False))
    # After 429s the key's pace, learnt from them, may hold the last retry a little more.
    assert len(slept) == 3 or (code == 429 and len(slept) == 4)
    usage = client.usage
    assert (usage.requests, usage.retries, usage.failures, usage.images_sent) == (4, 3, 0, 1)
    assert usage.bytes_sent == sum(len(request.content) for request in recorder.requests)
    assert len(usage.latencies("POST /detect")) == 4


@pytest.mark.parametrize(
    "error", [httpx.ConnectError, httpx.ReadTimeout, httpx.RemoteProtocolError]
)
def test_dropped_connections_and_timeouts_are_retried(error: type[httpx.TransportError]) -> None:
    def drop(request: httpx.Request) -> httpx.Response:
        raise error("dropped", request=request)

    client, recorder, _ = make_client(failing(2, drop))
    assert client.caption(IMAGE).caption == "A red square."
    assert len(recorder.requests) == 3


def test_retry_after_is_honoured_and_a_429_pauses_the_key() -> None:
    client, _, slept = make_client(
        failing(
            1,
            status(429, **{"Retry-After": "7"}),
            failing(1, status(503, **{"Retry-After": "2.5"})),
        )
    )
    client.query(None, "q")
    assert slept == [7.0, 2.5]
    # The 429 was waited out, not counted as a failed attempt, and the usage says so.
    assert (client.usage.rate_limited, client.usage.retries, client.usage.failures) == (1, 2, 0)


def test_429s_are_waited_out_beyond_max_retries_and_shared_with_the_tuning_client() -> None:
    client, recorder, _ = make_client(failing(6, status(429)), max_retries=1)
    assert client.detect(IMAGE, "car").objects == [Box(**BOX)]
    assert len(recorder.requests) == 7 and client.usage.rate_limited == 6
    # The account's limit covers inference and tuning: one key, one limiter.
    with (
        TuningClient(api_key=KEY, base_url=BASE + "/tuning") as tuning,
        InferenceClient.for_tuning(tuning) as inference,
        InferenceClient(api_key=KEY, base_url=BASE) as standalone,
    ):
        assert inference.rate_limiter is tuning.rate_limiter is standalone.rate_limiter


def test_a_refusal_is_not_retried_and_retries_stop_at_the_limit() -> None:
    client, recorder, slept = make_client(status(400, "image too small"))
    with pytest.raises(InvalidRequestError, match="image too small"):
        client.detect(IMAGE, "car")
    assert len(recorder.requests) == 1 and slept == []

    client, recorder, slept = make_client(status(503, **{"Retry-After": "3"}), max_retries=2)
    with pytest.raises(ServerError):
        client.detect(IMAGE, "car")
    assert len(recorder.requests) == 3 and slept == [3.0, 3.0]
    assert (client.usage.retries, client.usage.failures) == (2, 1)


def test_429s_stop_only_when_the_time_allowed_for_them_is_spent() -> None:
    client, recorder, slept = make_client(status(429, **{"Retry-After": "3"}), max_retries=0)
    client.retry_policy.max_rate_limited_wait = 9.0
    with pytest.raises(RateLimitError) as caught:
        client.detect(IMAGE, "car")
    assert caught.value.retry_after == 3.0
    assert len(recorder.requests) == 4 and slept == [3.0, 3.0, 3.0]
    assert (client.usage.rate_limited, client.usage.failures) == (4, 1)


def test_the_key_never_shows_in_reprs_or_errors() -> None:
    client, _, _ = make_client(status(401, f"bad key {KEY}"), max_retries=0)
    with pytest.raises(AuthenticationError) as caught:
        client.query(None, "q")
    texts = [repr(client), str(client.__dict__), str(caught.value), repr(caught.value)]
    assert all(KEY not in text for text in texts)
    assert "bad key **********" in str(caught.value)

    def drop(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"refused for {request.headers['X-Moondream-Auth']}")

    client, _, _ = make_client(drop, max_retries=0)
    with pytest.raises(APIConnectionError) as dropped:
        client.query(None, "q")
    assert KEY not in str(dropped.value) and "**********" in str(dropped.value)


def test_the_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOONDREAM_API_KEY", raising=False)
    with pytest.raises(MissingAPIKeyError, match="MOONDREAM_API_KEY"):
        InferenceClient(base_url=BASE)
    monkeypatch.setenv("MOONDREAM_API_KEY", KEY)
    recorder = Recorder(canned)
    client = InferenceClient(
        base_url=BASE, http_client=httpx.Client(transport=httpx.MockTransport(recorder))
    )
    client.query(None, "q")
    assert recorder.requests[0].headers["X-Moondream-Auth"] == KEY
    assert KEY not in repr(client)


# Base URL -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "environment", "expected"),
    [
        ({}, {}, DEFAULT_INFERENCE_URL),
        ({"base_url": "http://a/v1/"}, {"MOONDREAM_INFERENCE_URL": "http://b/v1"}, "http://a/v1"),
        (
            {"tuning_url": "http://t/v1/tuning"},
            {"MOONDREAM_INFERENCE_URL": "http://b/v1"},
            "http://b/v1",
        ),
        (
            {"tuning_url": "http://t:9/v1/tuning/"},
            {"MOONDREAM_TUNING_URL": "http://e/v1/tuning"},
            "http://t:9/v1",
        ),
        (
            {},
            {"MOONDREAM_TUNING_URL": "http://127.0.0.1:8000/v1/tuning"},
            "http://127.0.0.1:8000/v1",
        ),
    ],
)
def test_the_base_url_follows_from_the_tuning_url_unless_given(
    monkeypatch: pytest.MonkeyPatch,
    arguments: dict[str, str],
    environment: dict[str, str],
    expected: str,
) -> None:
    for name in ("MOONDREAM_INFERENCE_URL", "MOONDREAM_TUNING_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert resolve_inference_url(**arguments) == expected
    client = InferenceClient(api_key=KEY, **arguments)
    assert client.base_url == expected
    client.close()


def test_a_tuning_url_without_tuning_cannot_give_the_base_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MOONDREAM_INFERENCE_URL", raising=False)
    with pytest.raises(ValueError, match=r"tuning_url 'http://t/api'.*base_url="):
        resolve_inference_url(tuning_url="http://t/api")


# Streaming ------------------------------------------------------------------------------


def pieces(content: bytes, size: int) -> list[bytes]:
    return [content[start : start + size] for start in range(0, len(content), size)]


class Reads(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that arrives in the given pieces, one network read each."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    def __iter__(self) -> Iterator[bytes]:
        yield from self.parts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part


def streamed(parts: list[bytes]) -> Handler:
    return lambda request: httpx.Response(200, stream=Reads(parts))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 64, 4096])
def test_streamed_text_survives_any_split_across_network_reads(size: int) -> None:
    client, recorder, _ = make_client(streamed(pieces(sse(STREAM_TEXT), size)))
    assert list(client.query_stream(IMAGE, "Describe", model=CHECKPOINT)) == STREAM_TEXT
    assert recorder.bodies()[0]["stream"] is True
    assert recorder.requests[0].headers["Accept"] == "text/event-stream"
    assert (client.usage.requests, client.usage.failures, client.usage.images_sent) == (1, 0, 1)


def test_event_framing_variants_are_read() -> None:
    content = (
        b": keep-alive\r\n\r\n"
        b"event: message\r\n"
        b'data: {"chunk":\r\n'
        b'data:  "one two"}\r\n\r\n'
        b'data: {"chunk": "three"}\n'  # one event per line, as the SDK reads them
        b'data: {"chunk": "!", "completed": true}\n'
        b'data: {"chunk": "after the end"}\n'
    )
    client, _, _ = make_client(streamed([content]))
    assert list(client.caption_stream(IMAGE)) == ["one two", "three", "!"]


@pytest.mark.parametrize(
    ("content", "error_class", "message"),
    [
        (sse(["cut ", "off"], completed=False), APIConnectionError, "ended before its completed"),
        (
            b'data: {"chunk": "a"}\n\ndata: {"error": {"message": "model unloaded"}}\n\n',
            ServerError,
            "mid-stream: model unloaded",
        ),
        (b"data: {not json\n\n", ServerError, "an event that is not JSON"),
        (b"data: [1, 2]\n\n", ServerError, "not a JSON object"),
    ],
)
def test_a_broken_stream_raises_and_is_not_retried(
    content: bytes, error_class: type[Exception], message: str
) -> None:
    client, recorder, _ = make_client(streamed([content]))
    received: list[str] = []
    with pytest.raises(error_class, match=message):
        received.extend(client.caption_stream(IMAGE))
    assert len(recorder.requests) == 1
    assert client.usage.failures == 1


def test_a_stream_cut_after_its_text_began_is_not_retried() -> None:
    class Cut(Reads):
        def __iter__(self) -> Iterator[bytes]:
            yield sse(STREAM_TEXT[:1], completed=False)
            raise httpx.ReadError("connection reset")

    client, recorder, _ = make_client(lambda request: httpx.Response(200, stream=Cut([])))
    received: list[str] = []
    with pytest.raises(APIConnectionError, match="POST /query failed: ReadError: connection reset"):
        received.extend(client.query_stream(None, "q"))
    assert received == STREAM_TEXT[:1]
    assert len(recorder.requests) == 1 and client.usage.failures == 1


def test_a_stream_is_retried_until_its_answer_begins() -> None:
    client, recorder, slept = make_client(
        failing(
            1,
            status(429, **{"Retry-After": "4"}),
            failing(1, status(503), streamed([sse(STREAM_TEXT)])),
        )
    )
    assert "".join(client.query_stream(None, "q")) == "".join(STREAM_TEXT)
    assert len(recorder.requests) == 3 and slept[0] == 4.0 and len(slept) == 2
    assert (client.usage.requests, client.usage.retries) == (3, 2)

    client, recorder, _ = make_client(status(404, f"no model {CHECKPOINT}"))
    with pytest.raises(NotFoundError, match=f"no model {CHECKPOINT}"):
        list(client.query_stream(None, "q", model=CHECKPOINT))


def test_a_stream_left_early_is_closed() -> None:
    closed = threading.Event()

    class Tracked(Reads):
        def close(self) -> None:
            closed.set()

    client, _, _ = make_client(
        lambda request: httpx.Response(200, stream=Tracked([sse(STREAM_TEXT)]))
    )
    stream = client.caption_stream(IMAGE)
    assert next(stream) == STREAM_TEXT[0]
    stream.close()
    assert closed.is_set()


# Batches --------------------------------------------------------------------------------


def test_many_keeps_input_order_and_bounds_concurrency() -> None:
    lock = threading.Lock()
    state = {"now": 0, "most": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            label = json.loads(request.content)["object"]
            return httpx.Response(200, json={"request_id": label, "objects": []})
        finally:
            with lock:
                state["now"] -= 1

    client, _, _ = make_client(handler)
    labels = [f"object {index}" for index in range(12)]
    results = client.many([DetectCall(IMAGE, label) for label in labels], max_concurrency=3)
    assert [result.request_id for result in results] == labels
    assert 1 <= state["most"] <= 3


def test_many_validates_every_call_before_sending() -> None:
    client, recorder, _ = make_client()
    calls = [DetectCall(IMAGE, "car"), PointCall(IMAGE, "wheel", model="ft@1")]
    with pytest.raises(InvalidRequestError, match=r"^calls\[1\]: model must be"):
        client.many(calls)
    assert recorder.requests == []
    with pytest.raises(ValueError, match="max_concurrency"):
        client.many(calls, max_concurrency=0)


def test_many_mixes_skills_and_models() -> None:
    client, recorder, _ = make_client(model=CHECKPOINT)
    results = client.many(
        [
            QueryCall(None, "q"),
            DetectCall(IMAGE, "car", model=BASE_MODEL),
            PointCall(IMAGE, "wheel"),
            CaptionCall(IMAGE, "short"),
        ]
    )
    assert [type(result).__name__ for result in results] == [
        "QueryResult",
        "DetectResult",
        "PointResult",
        "CaptionResult",
    ]
    assert [body["model"] for body in recorder.bodies()] == [
        CHECKPOINT,
        BASE_MODEL,
        CHECKPOINT,
        CHECKPOINT,
    ]


# Asynchronous ---------------------------------------------------------------------------


def test_async_client_sends_the_same_wire_and_reads_the_same_answers() -> None:
    sync_client, recorder, _ = make_client(model=CHECKPOINT)
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return canned(request)

    async def run() -> list[Any]:
        async with make_async_client(handler, model=CHECKPOINT)[0] as client:
            return [
                await client.query(IMAGE, "How many?", reasoning=True),
                await client.detect(IMAGE, "car", settings={"max_objects": 2}),
                await client.point(IMAGE, "wheel", spatial_refs=[[0.5, 0.5]]),
                await client.caption(IMAGE, length="long"),
            ]

    answers = asyncio.run(run())
    expected = [
        sync_client.query(IMAGE, "How many?", reasoning=True),
        sync_client.detect(IMAGE, "car", settings={"max_objects": 2}),
        sync_client.point(IMAGE, "wheel", spatial_refs=[[0.5, 0.5]]),
        sync_client.caption(IMAGE, length="long"),
    ]
    assert answers == expected
    assert [json.loads(request.content) for request in sent] == recorder.bodies()
    assert all(request.headers["X-Moondream-Auth"] == KEY for request in sent)


def test_async_client_retries_and_honours_retry_after() -> None:
    async def run() -> tuple[Any, list[float], Any]:
        client, slept = make_async_client(
            failing(1, status(429, **{"Retry-After": "6"}), failing(1, status(502)))
        )
        async with client:
            result = await client.detect(IMAGE, "car")
        return result, slept, client.usage

    result, slept, usage = asyncio.run(run())
    assert result.objects == [Box(**BOX)]
    assert slept[0] == 6.0 and 0 <= slept[1] <= 1.0
    assert (usage.requests, usage.retries) == (3, 2)


@pytest.mark.parametrize("size", [1, 4, 4096])
def test_async_streams_survive_any_split_and_detect_a_cut(size: int) -> None:
    async def collect(parts: list[bytes]) -> list[str]:
        client, _ = make_async_client(streamed(parts))
        async with client:
            return [chunk async for chunk in client.query_stream(IMAGE, "q")]

    assert asyncio.run(collect(pieces(sse(STREAM_TEXT), size))) == STREAM_TEXT
    with pytest.raises(APIConnectionError, match="ended before its completed"):
        asyncio.run(collect(pieces(sse(STREAM_TEXT, completed=False), size)))


def test_an_async_stream_left_early_is_closed() -> None:
    closed = []

    class Tracked(Reads):
        async def aclose(self) -> None:
            closed.append(True)

    async def first_chunk() -> str:
        client, _ = make_async_client(
            lambda request: httpx.Response(200, stream=Tracked([sse(STREAM_TEXT)]))
        )
        async with client:
            stream = client.caption_stream(IMAGE)
            chunk = await anext(stream)
            await stream.aclose()
            return chunk

    assert asyncio.run(first_chunk()) == STREAM_TEXT[0]
    assert closed == [True]


def test_async_stream_is_validated_when_called() -> None:
    client, _ = make_async_client()
    with pytest.raises(InvalidRequestError, match=r"^model must be"):
        client.caption_stream(IMAGE, model="bad model")


def test_async_many_keeps_order_and_runs_exactly_the_concurrency_asked() -> None:
    state = {"now": 0, "most": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        state["now"] += 1
        state["most"] = max(state["most"], state["now"])
        await asyncio.sleep(0)
        state["now"] -= 1
        label = json.loads(request.content)["object"]
        return httpx.Response(200, json={"request_id": label, "points": []})

    labels = [f"object {index}" for index in range(10)]

    async def run() -> list[Any]:
        client, _ = make_async_client(handler)
        async with client:
            return await client.many(
                [PointCall(IMAGE, label) for label in labels], max_concurrency=4
            )

    assert [result.request_id for result in asyncio.run(run())] == labels
    assert state["most"] == 4


def test_async_many_fails_the_whole_batch_on_one_failure() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["object"] == "bad":
            return httpx.Response(404, json={"error": {"message": "no such model"}})
        return canned(request)

    async def run() -> None:
        client, _ = make_async_client(handler)
        async with client:
            await client.many([DetectCall(IMAGE, "car"), DetectCall(IMAGE, "bad")])

    with pytest.raises(NotFoundError, match="no such model"):
        asyncio.run(run())
