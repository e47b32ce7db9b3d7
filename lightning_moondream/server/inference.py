"""Moondream's inference API on the local service: read-only answers from a model.

Free of HTTP, like ``service``: methods take the caller's owner id and the request's
JSON body, and return plain answers or raise ``ServiceError`` naming the field or the
model. ``routes_inference`` turns them into the API's JSON and event streams.

A model (``model`` in the body) is one of:

- omitted or ``moondream3-preview``: the base policy, with no adapter;
- ``moondream3-preview/{finetune_id}@{step}``: the finetune's checkpoint saved at that
  train step (the latest one saved there), in either dialect, since a finetune is an
  adapter;
- ``moondream3-preview/{adapter_id}@{chk_id}``: an ``/adapters`` checkpoint named by its
  id ``adapter_id/chk_id``.

A checkpoint answers from the weights it saved, never from its finetune's current ones,
and answering never changes anything. A malformed model is a 400, a well-formed one that
the caller has not (unknown, another key's, deleted or expired) a 404; both name it.
Requests are validated as ``/rollouts`` validates its ``request``, with the same
defaults, and sampled the same way, so a greedy answer (temperature 0) is exactly the
greedy rollout of the same request from the same weights.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, get_args

import anyio.to_thread

from lightning_moondream.api.inference_models import (
    BASE_MODEL,
    MODEL_FORMS,
    CaptionLength,
    InferenceModel,
    parse_model,
)
from lightning_moondream.data.synthetic import SHAPES
from lightning_moondream.server.codec import prompt_buckets
from lightning_moondream.server.engine import AdapterState
from lightning_moondream.server.errors import ServiceError
from lightning_moondream.server.results import SampledRollout
from lightning_moondream.server.service import Service
from lightning_moondream.server.store import CheckpointRecord, now_ms
from lightning_moondream.server.validation import ParsedRequest

SKILL_FIELDS = {
    "query": {"image_url", "question", "settings", "reasoning", "spatial_refs"},
    "detect": {"image_url", "object", "settings"},
    "point": {"image_url", "object", "settings", "spatial_refs"},
}
"""The request fields of each skill's endpoint, besides ``model`` and ``stream``."""
STREAMING = ("query", "caption")
"""Endpoints that may answer as a stream of text chunks."""
CAPTION_LENGTHS: tuple[str, ...] = get_args(CaptionLength)
CACHED_CHECKPOINTS = 16
"""Checkpoint weights kept in memory, most recently used first."""

_BASE = AdapterState(rank=0)
"""The base policy: no low-rank update at all."""
_STEPS_LISTED = 100


@dataclass(frozen=True)
class Answer:
    """A model's answer to one request of a skill.

    Attributes:
        request_id: The id of this request.
        parsed: The validated request.
        rollout: The sampled answer, unsigned (it can never be trained on).
    """

    request_id: str
    parsed: ParsedRequest
    rollout: SampledRollout


@dataclass(frozen=True)
class Caption:
    """A caption and what generating it took.

    Attributes:
        request_id: The id of this request.
        text: The caption.
        input_tokens: Prompt tokens the policy read: the words of every question asked,
            plus one per image encoding.
        output_tokens: The caption's words.
        finish_reason: ``"stop"``, or ``"length"`` if ``max_tokens`` cut the caption.
    """

    request_id: str
    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str


def _request_id(skill: str) -> str:
    return f"{skill}_{uuid.uuid4().hex[:20]}"


def _fields(body: dict[str, Any], endpoint: str, allowed: set[str]) -> dict[str, Any]:
    """The body's request fields, checked against those the endpoint has.

    Raises:
        ServiceError: 422 naming an unknown field, or ``stream`` where it is not valid.
    """
    unknown = sorted(set(body) - allowed - {"model", "stream"})
    if unknown:
        raise ServiceError(422, f"{', '.join(unknown)}: not a field of /{endpoint}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ServiceError(422, f"stream: must be true or false, got {stream!r}")
    if stream and endpoint not in STREAMING:
        raise ServiceError(422, f"stream: /{endpoint} does not stream; only /query and /caption")
    return {name: value for name, value in body.items() if name in allowed}


class Inference:
    """Answers of the inference API from the base policy or saved checkpoints.

    Args:
        service: The tuning service whose checkpoints, keys and policy answer.
        seed: Seed of the sampling seeds of answers at a temperature above 0.
    """

    def __init__(self, service: Service, seed: int) -> None:
        self.service = service
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._weights: OrderedDict[str, AdapterState] = OrderedDict()

    # Models --------------------------------------------------------------------------

    async def weights(self, owner: str, model: Any) -> AdapterState:
        """The weights a model answers with, read-only.

        Raises:
            ServiceError: 400 for a malformed model, 404 for one the owner has not.
        """
        if model is None:
            return _BASE
        if not isinstance(model, str):
            raise ServiceError(400, f"model: must be a string such as {MODEL_FORMS}, got {model!r}")
        try:
            parsed = parse_model(model)
        except ValueError as exc:
            raise ServiceError(400, str(exc)) from exc
        if parsed.base != BASE_MODEL:
            raise ServiceError(404, f"model {model!r} not found: the base model is {BASE_MODEL!r}")
        if parsed.is_base:
            return _BASE
        record = self._checkpoint(owner, parsed, model)
        return await self._load(record.checkpoint_id, model)

    def _checkpoint(self, owner: str, parsed: InferenceModel, model: str) -> CheckpointRecord:
        """The saved checkpoint a model names.

        Raises:
            ServiceError: 404 naming the model if it is unknown, deleted or expired.
        """
        finetune_id = str(parsed.finetune_id)
        store = self.service.store
        if store.get_adapter(owner, finetune_id) is None:
            raise ServiceError(
                404, f"model {model!r} not found: no finetune {finetune_id!r} (unknown or deleted)"
            )
        if parsed.checkpoint is not None:
            record = store.get_checkpoint(owner, f"{finetune_id}/{parsed.checkpoint}")
        else:
            record = store.checkpoint_at_step(owner, finetune_id, int(parsed.step or 0))
        if record is None:
            raise ServiceError(
                404,
                f"model {model!r} not found: finetune {finetune_id!r} has no such saved "
                f"checkpoint ({self._saved(owner, finetune_id)})",
            )
        if record.expires_at_ms is not None and now_ms() >= record.expires_at_ms:
            raise ServiceError(
                404, f"model {model!r} has expired: its checkpoint is no longer kept"
            )
        return record

    def _saved(self, owner: str, finetune_id: str) -> str:
        """What the finetune has saved, for an error message."""
        records, more = self.service.list_checkpoints(owner, finetune_id, _STEPS_LISTED, 0)
        if not records:
            return "it has none"
        saved = ", ".join(f"{record.step}" for record in records)
        return f"saved at steps {saved}{', ...' if more else ''}"

    async def _load(self, checkpoint_id: str, model: str) -> AdapterState:
        """A checkpoint's weights, from memory if read recently.

        A checkpoint id is never reused, so its weights can be kept while it exists.
        """
        with self._lock:
            state = self._weights.get(checkpoint_id)
            if state is not None:
                self._weights.move_to_end(checkpoint_id)
                return state
        store = self.service.store

        def read() -> AdapterState:
            saved = AdapterState.from_dict(store.load_state(store.checkpoint_path(checkpoint_id)))
            # Answering needs the weights only: the optimizer's moments are not kept.
            return AdapterState(saved.rank, saved.weights)

        try:
            state = await anyio.to_thread.run_sync(read)
        except OSError as exc:
            # Deleted between finding its record and reading its file.
            raise ServiceError(
                404, f"model {model!r} not found: its checkpoint was deleted"
            ) from exc
        with self._lock:
            self._weights[checkpoint_id] = state
            while len(self._weights) > CACHED_CHECKPOINTS:
                self._weights.popitem(last=False)
        return state

    # Answers -------------------------------------------------------------------------

    def _seed(self) -> int:
        with self._lock:
            return self._random.getrandbits(63)

    async def sample(self, state: AdapterState, parsed: ParsedRequest) -> SampledRollout:
        """One answer to a validated request from ``state``.

        Raises:
            ServiceError: 400 for an image whose payload is unreadable.
        """
        (rollout,) = await self.service.sample(state, parsed, 1, self._seed())
        return rollout

    async def answer(self, owner: str, skill: str, body: dict[str, Any]) -> Answer:
        """Answer ``/query``, ``/detect`` or ``/point``.

        Args:
            owner: The caller's owner id.
            skill: ``"query"``, ``"detect"`` or ``"point"``.
            body: The request's JSON body.

        Raises:
            ServiceError: 422 naming a bad field, 400 for an unreadable image or a
                malformed model, 404 for a model the owner has not.
        """
        fields = _fields(body, skill, SKILL_FIELDS[skill])
        parsed = self.service.parse_request({**fields, "skill": skill}, "body")
        state = await self.weights(owner, body.get("model"))
        return Answer(_request_id(skill), parsed, await self.sample(state, parsed))

    async def caption(self, owner: str, body: dict[str, Any]) -> Caption:
        """Answer ``/caption``.

        The reference policy has no caption head: the caption is built from the
        policy's own answers to questions about the image (how many of each shape it
        sees and, for ``"long"``, the color of a shape it sees once), so it follows the
        model's weights and, at temperature 0, is deterministic. ``settings`` apply to
        those answers, ``max_tokens`` to the caption's words.

        Raises:
            ServiceError: 422 naming a bad field, 400 for an unreadable image or a
                malformed model, 404 for a model the owner has not.
        """
        fields = _fields(body, "caption", {"image_url", "length", "settings"})
        length = fields.pop("length", "normal")
        if length not in CAPTION_LENGTHS:
            raise ServiceError(
                422, f"length: must be one of {', '.join(CAPTION_LENGTHS)}, got {length!r}"
            )
        if fields.get("image_url") is None:
            raise ServiceError(422, "image_url: field required (a base64 data URL)")
        settings = fields.get("settings")
        if isinstance(settings, dict) and "max_objects" in settings:
            raise ServiceError(422, "settings.max_objects: only valid for detect, not caption")
        # Validates the image and settings once, before any model work.
        checked = self.service.parse_request({**fields, "skill": "query", "question": "?"}, "body")
        if isinstance(settings, dict):
            # max_tokens bounds the caption, not the answers it is built from.
            fields["settings"] = {k: v for k, v in settings.items() if k != "max_tokens"}
        state = await self.weights(owner, body.get("model"))
        describer = _Describer(self, state, fields)
        counts = {shape: await describer.count(shape) for shape in SHAPES}
        colors = (
            {shape: await describer.color(shape) for shape, n in counts.items() if n == 1}
            if length == "long"
            else {}
        )
        words = _caption(counts, colors, length).split(" ")
        cut = checked.max_tokens < len(words)
        if cut:
            words = words[: checked.max_tokens]
        return Caption(
            _request_id("caption"),
            " ".join(words),
            describer.input_tokens,
            len(words),
            "length" if cut else "stop",
        )


class _Describer:
    """The questions a caption is built from, asked of one model about one image."""

    def __init__(self, inference: Inference, state: AdapterState, fields: dict[str, Any]) -> None:
        self._inference = inference
        self._state = state
        self._fields = fields
        self.input_tokens = 0

    async def _ask(self, question: str) -> str:
        inference = self._inference
        request = {**self._fields, "skill": "query", "question": question}
        parsed = inference.service.parse_request(request, "body")
        self.input_tokens += len(prompt_buckets(question)) + 1
        rollout = await inference.sample(self._state, parsed)
        return str(rollout.output["answer"])

    async def count(self, shape: str) -> int:
        """How many of a shape the model sees (0 if it answers something else)."""
        answer = await self._ask(f"How many {shape}s are there?")
        return int(answer) if answer.isdigit() else 0

    async def color(self, shape: str) -> str | None:
        """The color the model gives the one shape of a kind, if it answers one."""
        answer = await self._ask(f"What color is the {shape}?")
        return answer if answer.isalpha() and answer not in ("yes", "no") else None


def _caption(counts: dict[str, int], colors: dict[str, str | None], length: str) -> str:
    """A caption from shape counts and colors, as long as asked."""
    seen = [f"{n} {shape}{'s' if n > 1 else ''}" for shape, n in counts.items() if n > 0]
    if not seen:
        return "No shapes." if length == "short" else "An image with no shapes."
    listed = seen[0] if len(seen) == 1 else f"{', '.join(seen[:-1])} and {seen[-1]}"
    if length == "short":
        return f"{listed[0].upper()}{listed[1:]}."
    details = [f"the {shape} is {color}" for shape, color in colors.items() if color]
    suffix = f"; {', '.join(details)}" if details else ""
    return f"An image of {listed}{suffix}."
