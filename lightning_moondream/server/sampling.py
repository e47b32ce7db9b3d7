"""Sampling answers from an adapter state: seeds, the engine's task, decoded outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import threading
from collections import OrderedDict

import torch

from lightning_moondream.api.limits import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from lightning_moondream.images import ImageError, decode_data_url
from lightning_moondream.server import codec, signing
from lightning_moondream.server.engine import AdapterState, Engine
from lightning_moondream.server.errors import ServiceError
from lightning_moondream.server.policy import Decoding, Task
from lightning_moondream.server.results import SampledRollout
from lightning_moondream.server.store import AdapterRecord
from lightning_moondream.server.validation import ParsedRequest

SAMPLE_COUNTS = 65536
"""Requests whose repeat count is kept for sampling seeds (see ``Seeds.for_rollouts``)."""


class Seeds:
    """The service's seeded stream, and order-independent seeds of rollouts requests.

    Args:
        seed: The service's seed.
    """

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._sample_counts: OrderedDict[tuple[str, int, str], int] = OrderedDict()

    def fresh(self) -> int:
        """A fresh seed from the service's seeded stream."""
        with self._lock:
            return self._random.getrandbits(63)

    def for_rollouts(self, adapter: AdapterRecord, request_digest: str) -> int:
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


def decoding_rules(parsed: ParsedRequest) -> Decoding:
    """The decoding rules of a request's settings."""
    return Decoding.for_request(parsed.skill, parsed.max_tokens, parsed.max_objects)


def task_of(parsed: ParsedRequest, max_pixels: int, reads_pixels: bool) -> Task:
    """Decode a validated request into what the engine samples for.

    Args:
        parsed: The validated request.
        max_pixels: Largest decoded image accepted.
        reads_pixels: Whether the engine looks at the image at all.

    Raises:
        ServiceError: 400 for an image whose payload is broken past its header.
    """
    request = parsed.request
    settings = request.settings
    image_url = getattr(request, "image_url", None)
    try:
        image = (
            decode_data_url(image_url, max_pixels=max_pixels)
            if image_url and reads_pixels
            else None
        )
    except ImageError as exc:
        # Validation read only the header; a payload broken past it shows up here.
        raise ServiceError(400, f"request.{exc}") from exc
    prompt = request.question if request.skill == "query" else request.object
    return Task(
        skill=request.skill,
        prompt=prompt,
        image=image,
        rules=decoding_rules(parsed),
        temperature=settings.temperature if settings else DEFAULT_TEMPERATURE,
        top_p=settings.top_p if settings else DEFAULT_TOP_P,
    )


def generate(
    engine: Engine,
    state: AdapterState,
    parsed: ParsedRequest,
    count: int,
    seed: int,
    max_pixels: int,
) -> list[SampledRollout]:
    """Sample ``count`` unsigned answers to a request from an adapter state; blocking.

    Raises:
        ServiceError: 400 for an unreadable image.
    """
    task = task_of(parsed, max_pixels, engine.reads_pixels)
    generator = torch.Generator().manual_seed(seed)
    rollouts = []
    for sample in engine.sample(state, task, count, generator):
        output = codec.decode(parsed.skill, sample.tokens)
        reasoning = (
            codec.reasoning(output["answer"], parsed.anchors()) if parsed.reasoning else None
        )
        rollouts.append(
            SampledRollout(parsed.skill, sample.tokens, sample.logprobs, output, reasoning)
        )
    return rollouts


def sign_rollouts(
    rollouts: list[SampledRollout], secret: bytes, adapter_id: str, request_digest: str
) -> list[SampledRollout]:
    """The rollouts signed for training: bound to their adapter and request."""
    return [
        dataclasses.replace(
            rollout,
            signature=signing.sign_rollout(
                secret, adapter_id, request_digest, rollout.tokens, rollout.logprobs
            ),
        )
        for rollout in rollouts
    ]
