"""A saved checkpoint (or the base model) answering through Moondream's inference API.

On ``/finetunes`` a checkpoint cannot start a finetune: it is served read-only by the
inference API as the model ``moondream3-preview/FT@STEP``. :func:`inference_model`
makes such a model a :data:`~lightning_moondream.session.sampling.GreedyModel`, so the
evaluation loop scores it exactly as it scores an adapter's greedy rollouts: each
answer is wrapped as a one-rollout response without rewards, and the scorer computes
them from the sample's ground truth (the formulas the service's rewards use).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_moondream.api import RolloutsResponse, Settings, inference_model_id
from lightning_moondream.api.inference import AsyncInferenceClient
from lightning_moondream.api.inference_models import (
    DetectCall,
    InferenceCall,
    InferenceResult,
    PointCall,
    QueryCall,
)
from lightning_moondream.scoring import Sample
from lightning_moondream.session.sampling import GreedyModel, InFlight, concurrency


def checkpoint_model(state: Mapping[str, Any]) -> str | None:
    """The inference model of a Lightning checkpoint's API state, if the API serves one.

    Only ``/finetunes`` checkpoints are models of the inference API; an ``/adapters``
    checkpoint gives ``None`` (it is evaluated through an adapter created from it).
    """
    if state.get("dialect") != "finetunes" or not state.get("checkpoint_id"):
        return None
    return state.get("model_id") or inference_model_id(str(state["checkpoint_id"]))


def inference_call(request: Mapping[str, Any], model: str) -> InferenceCall[InferenceResult]:
    """The inference call asking what a tuning request (``sample.to_request().to_json()``) asks.

    Raises:
        ValueError: If the request asks what the inference API cannot (detect with
            spatial references).
    """
    skill, settings = request.get("skill"), request.get("settings")
    if skill == "detect":
        if request.get("spatial_refs"):
            raise ValueError(
                "a detect sample with spatial_refs cannot be answered by the inference API, "
                "whose /detect takes none"
            )
        return DetectCall(request["image_url"], request["object"], settings, model=model)
    if skill == "point":
        refs = request.get("spatial_refs")
        return PointCall(request["image_url"], request["object"], settings, refs, model=model)
    return QueryCall(
        request.get("image_url"),
        request["question"],
        settings,
        request.get("reasoning"),
        request.get("spatial_refs"),
        model=model,
    )


def as_response(request: Mapping[str, Any], result: InferenceResult) -> RolloutsResponse:
    """An inference answer as a one-rollout response without rewards (scored by the scorer)."""
    output = result.model_dump(mode="json", exclude={"request_id"}, exclude_none=True)
    rollout = {"skill": request.get("skill"), "output": output}
    return RolloutsResponse({"request": dict(request), "rollouts": [rollout], "rewards": None})


def inference_model(
    client: AsyncInferenceClient,
    model: str,
    settings: Settings,
    max_concurrency: int | None,
    in_flight: InFlight = lambda: None,
) -> GreedyModel:
    """The :data:`GreedyModel` of an inference model: one call per sample, in order.

    Args:
        client: The inference client (of the service the run tunes on).
        model: The model id, e.g. ``moondream3-preview/FT@STEP``.
        settings: Generation settings (greedy: temperature 0).
        max_concurrency: Calls in flight at once; by default what ``in_flight`` asks,
            else the whole batch (capped).
        in_flight: Calls to keep in flight now, ``None`` when unknown.
    """

    async def answer(samples: Sequence[Sample]) -> list[RolloutsResponse]:
        requests = [sample.to_request(settings).to_json() for sample in samples]
        calls = [inference_call(request, model) for request in requests]
        limit = concurrency(max_concurrency, len(calls), in_flight())
        results = await client.many(calls, max_concurrency=limit)
        return [
            as_response(request, result) for request, result in zip(requests, results, strict=True)
        ]

    return answer
