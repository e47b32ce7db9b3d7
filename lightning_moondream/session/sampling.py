"""Sampling: batches checked and encoded, rollouts requested, and each rollout scored.

Requests are built on the caller's thread (a sample not encoded yet encodes its image
there), so the client's event loop, which in one process also runs the local service,
only sends and scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from lightning_moondream.api import AsyncTuningClient, RolloutCall, RolloutsResponse, Settings
from lightning_moondream.data.encoding import DEFAULT_MAX_SIDE, DEFAULT_QUALITY
from lightning_moondream.images import EncodingOptions
from lightning_moondream.scoring import Sample, Scorer

MAX_DEFAULT_CONCURRENCY = 64
"""Most rollouts requests in flight by default: the whole batch, up to this many."""

SAMPLE_ENCODING = EncodingOptions(max_side=DEFAULT_MAX_SIDE, quality=DEFAULT_QUALITY)
"""How a sample that reaches the session unencoded is encoded: as ``MoondreamDataModule``
encodes by default, so a user's own DataLoader of paths or PIL images sends the same bytes."""

SKILLS = ("query", "point", "detect")

GreedyModel = Callable[[Sequence[Sample]], Coroutine[Any, Any, list[RolloutsResponse]]]
"""A model under evaluation: answers each sample with one greedy response, in order.

The evaluation loop scores ``response.rollouts[0]`` with the response's own reward when
the service gave one, else with the scorer's reward function, so a model answering
through another API (rewards ``None``) plugs in as it is.
"""


def check_batch(batch: Sequence[Sample], batch_idx: int) -> Sequence[Sample]:
    """The batch, if it is a non-empty list of Moondream samples.

    Raises:
        TypeError: If the batch is not a sequence of samples, naming the batch and item.
        ValueError: If the batch is empty.
    """
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence):
        raise TypeError(
            f"batch {batch_idx} is a {type(batch).__name__}; MoondreamRLModule takes a list of samples "
            "(use MoondreamDataModule, or collate_fn=list in your DataLoader)"
        )
    if not batch:
        raise ValueError(f"batch {batch_idx} is empty: a training step needs at least one sample")
    for index, sample in enumerate(batch):
        if not hasattr(sample, "to_request") or getattr(sample, "skill", None) not in SKILLS:
            raise TypeError(
                f"batch {batch_idx} item {index} is a {type(sample).__name__}, not a Moondream sample "
                "(DetectSample, PointSample or QuerySample)"
            )
    return batch


def encoded(samples: Sequence[Sample]) -> list[Sample]:
    """The samples with their images encoded (``SAMPLE_ENCODING``) if they are not yet.

    Samples of ``MoondreamDataModule`` arrive encoded and are returned as they are.
    """
    return [
        sample.encoded(SAMPLE_ENCODING) if hasattr(sample, "encoded") else sample
        for sample in samples
    ]


def share(samples: Sequence[Sample], fraction: float) -> list[Sample]:
    """The samples that a ``fraction`` of the batch picks, spread evenly over it."""
    return [
        sample
        for index, sample in enumerate(samples)
        if math.floor((index + 1) * fraction) > math.floor(index * fraction)
    ]


InFlight = Callable[[], int | None]
"""Requests to keep in flight now (``Connection.in_flight``), ``None`` when unknown."""


def concurrency(max_concurrency: int | None, requests: int, in_flight: int | None = None) -> int:
    """Requests in flight at once.

    ``max_concurrency`` if given; else ``in_flight`` (what the admitted rate and the
    latency call for) or, unknown, the whole batch, either capped.
    """
    if max_concurrency is not None:
        return max_concurrency
    return max(1, min(MAX_DEFAULT_CONCURRENCY, requests, in_flight or requests))


def rollout_calls(
    adapter_id: str,
    samples: Sequence[Sample],
    settings: Settings,
    num_rollouts: int,
    scorer: Scorer | None,
) -> list[RolloutCall]:
    """One ``/rollouts`` call per sample.

    A sample's ground truth goes with it where ``scorer`` uses the service's rewards
    (never without a scorer).
    """
    return [
        RolloutCall(
            adapter_id,
            sample.to_request(settings),
            num_rollouts,
            sample.ground_truth()
            if scorer is not None and scorer.sends_ground_truth(sample)
            else None,
        )
        for sample in samples
    ]


async def sample_and_score(
    client: AsyncTuningClient,
    calls: Sequence[RolloutCall],
    samples: Sequence[Sample],
    scorer: Scorer,
    max_concurrency: int,
) -> list[tuple[RolloutsResponse, list[float]]]:
    """Send every sample's call at once and score each response's rollouts.

    Returns:
        One ``(response, rewards)`` pair per sample, in order.
    """
    responses = await client.rollouts_many(calls, max_concurrency=max_concurrency)
    return [
        (response, await scorer.score(sample, response))
        for sample, response in zip(samples, responses, strict=True)
    ]


def tuning_model(
    client: AsyncTuningClient,
    adapter_id: str,
    settings: Settings,
    scorer: Scorer | None,
    max_concurrency: int | None,
    in_flight: InFlight = lambda: None,
) -> GreedyModel:
    """The :data:`GreedyModel` of an adapter of the tuning API: one rollout per sample.

    Ground truth goes with the requests where ``scorer`` uses the service's rewards;
    with no scorer, none goes. Without ``max_concurrency``, each batch keeps what
    ``in_flight`` asks in flight, if it knows (see :func:`concurrency`).
    """

    async def answer(samples: Sequence[Sample]) -> list[RolloutsResponse]:
        calls = rollout_calls(adapter_id, samples, settings, 1, scorer)
        limit = concurrency(max_concurrency, len(calls), in_flight())
        return await client.rollouts_many(calls, max_concurrency=limit)

    return answer
