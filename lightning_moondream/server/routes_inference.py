"""Moondream's inference API (``/v1/query``, ``/detect``, ``/point``, ``/caption``): HTTP to ``inference``.

The JSON is Moondream Cloud's, as its official SDK sends and reads it:

- ``/query`` -> ``{request_id, answer, reasoning?}`` (``reasoning`` is
  ``{text, grounding: [{start_idx, end_idx, points}]}``, as in a query rollout);
- ``/detect`` -> ``{request_id, objects: [{x_min, y_min, x_max, y_max}]}``;
- ``/point`` -> ``{request_id, points: [{x, y}]}``;
- ``/caption`` -> ``{request_id, caption, metrics: {input_tokens, output_tokens},
  finish_reason}``.

``/query`` and ``/caption`` with ``"stream": true`` answer server-sent events: lines
``data: {"chunk": "..."}``, then one ``data: {"completed": true, ...}`` holding the rest
of the answer (``request_id``, and ``reasoning``, or ``metrics`` and ``finish_reason``).
The answer is computed before the stream starts, so a refused request is an ordinary
JSON error. Auth, body limit, latency and injected faults (endpoint group
``"inference"``) are the tuning routes'.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from lightning_moondream.server.http_common import (
    INFERENCE_PREFIX,
    authenticated,
    json_answer,
    json_body,
)
from lightning_moondream.server.inference import Answer, Caption, Inference

router = APIRouter(prefix=INFERENCE_PREFIX)


def _inference(request: Request) -> tuple[Inference, str]:
    """The app's inference domain, and the caller's owner id (checked first)."""
    _, owner = authenticated(request)
    inference: Inference = request.app.state.inference
    return inference, owner


def _events(chunks: list[str], completed: dict[str, Any]) -> StreamingResponse:
    """A text answer as server-sent events: its chunks, then the completing event."""

    def lines() -> Iterator[str]:
        for chunk in chunks:
            yield f"data: {json.dumps({'chunk': chunk})}\n\n"
        yield f"data: {json.dumps({'completed': True, **completed})}\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


def _words(text: str) -> list[str]:
    """A text cut into chunks of one word each, with the space before it."""
    words = text.split(" ")
    return [words[0], *(f" {word}" for word in words[1:])] if text else []


def _output(answer: Answer) -> dict[str, Any]:
    """An answer's output in the API's shape, with its request id."""
    output = dict(answer.rollout.output)
    if answer.parsed.skill == "detect":
        output = {"objects": output["boxes"]}
    return {"request_id": answer.request_id, **output}


def _reasoning(answer: Answer) -> dict[str, Any]:
    reasoning = answer.rollout.reasoning
    if reasoning is None:
        return {}
    return {"reasoning": {"text": reasoning["text"], "grounding": reasoning["grounding"]}}


@router.post("/query")
async def query(request: Request) -> Response:
    """``POST /v1/query``: an answer, streamed if asked."""
    inference, owner = _inference(request)
    body = await json_body(request)
    answer = await inference.answer(owner, "query", body)
    if body.get("stream"):
        completed = {"request_id": answer.request_id, **_reasoning(answer)}
        return _events(_words(answer.rollout.output["answer"]), completed)
    return json_answer({**_output(answer), **_reasoning(answer)})


@router.post("/detect")
async def detect(request: Request) -> Response:
    """``POST /v1/detect``."""
    inference, owner = _inference(request)
    answer = await inference.answer(owner, "detect", await json_body(request))
    return json_answer(_output(answer))


@router.post("/point")
async def point(request: Request) -> Response:
    """``POST /v1/point``."""
    inference, owner = _inference(request)
    answer = await inference.answer(owner, "point", await json_body(request))
    return json_answer(_output(answer))


def _caption_rest(caption: Caption) -> dict[str, Any]:
    return {
        "request_id": caption.request_id,
        "metrics": {
            "input_tokens": caption.input_tokens,
            "output_tokens": caption.output_tokens,
        },
        "finish_reason": caption.finish_reason,
    }


@router.post("/caption")
async def caption(request: Request) -> Response:
    """``POST /v1/caption``: a caption, streamed if asked."""
    inference, owner = _inference(request)
    body = await json_body(request)
    answer = await inference.caption(owner, body)
    if body.get("stream"):
        return _events(_words(answer.text), _caption_rest(answer))
    return json_answer({"caption": answer.text, **_caption_rest(answer)})


def install(app: FastAPI, seed: int) -> None:
    """Serve the inference API from ``app``'s service, sampling with ``seed``."""
    app.state.inference = Inference(app.state.service, seed)
    app.include_router(router)
