"""The reference vision-language policy of the local service.

A deliberately small model that still has the parts RL needs:

- an image encoder: a three-layer CNN on a 64x64 image, with coordinate channels so
  positions are easy to read out;
- a prompt encoder: mean-pooled hashed word embeddings (see ``codec.prompt_buckets``),
  which modulate the image features (FiLM) so the prompt selects what to look at;
- an autoregressive decoder (an Elman RNN built from linear layers) with two heads:
  coordinate tokens for points and boxes, answer words for queries;
- a shift head that moves the coordinate bin logits by a fractional number of bins,
  one shift per coordinate slot (see ``shift_bins``). Its base weights are zero, so the
  base policy never shifts; it is a handle for adapters. A systematic error shared by
  all boxes, such as drawing every box too large, is a different bin per box for the
  coordinate head, a high-rank change, but a few shifts per slot for this head, a
  low-rank change that RL finds in tens of steps.

Base weights are frozen and shared; every linear layer (not the convolutions) takes a
LoRA update from the adapter passed to each call. Decoding rules are masks applied
identically when sampling and when scoring tokens for training, so the log-probabilities
of both agree: the end token only between objects, a box's maximum strictly above its
minimum, at most ``max_objects`` objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from lightning_moondream.images import to_rgb
from lightning_moondream.server import codec
from lightning_moondream.server.lora import lora_linear

IMAGE_SIZE = 64
HIDDEN = 128
EMBED = 32
DEFAULT_MAX_OBJECTS = 8
"""Objects decoded at most without ``max_objects`` (point requests, which take none).

No request decodes more than twice this, whatever its ``max_objects`` (detect's default
is 50): the small policy's own limit.
"""
SKILL_INDEX = {"query": 0, "point": 1, "detect": 2}
BASE_WEIGHTS = Path(__file__).with_name("weights") / "base.pt"
_MASKED = -1e9
SHIFT_UNIT = 2.0
"""Bins moved per unit of the shift head's output.

Corrections RL makes are a few bins, and a fresh adapter's low-rank update starts at zero
and grows by small Adam steps: a unit of two bins lets it reach them within tens of train
steps without making single steps coarse.
"""


def image_tensor(image: Image.Image | None) -> torch.Tensor:
    """The ``(3, 64, 64)`` input of an image; a blank image for a query without one."""
    if image is None:
        return torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)
    resized = to_rgb(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() - 0.5


@dataclass(frozen=True)
class Decoding:
    """The decoding rules of one batch of sequences (all rows share them).

    Attributes:
        skill: ``"query"``, ``"point"`` or ``"detect"``.
        max_len: Most tokens per sequence (``max_tokens`` and the object cap).
        max_objects: Most objects per sequence (point and detect).
    """

    skill: str
    max_len: int
    max_objects: int

    @classmethod
    def for_request(cls, skill: str, max_tokens: int, max_objects: int | None) -> Decoding:
        """Rules for a request's settings."""
        if skill == "query":
            return cls(skill, min(max_tokens, codec.MAX_ANSWER_TOKENS + 1), 0)
        objects = max_objects if max_objects is not None else DEFAULT_MAX_OBJECTS
        objects = min(objects, DEFAULT_MAX_OBJECTS * 2)
        return cls(skill, min(max_tokens, objects * codec.TOKENS_PER_OBJECT[skill] + 1), objects)


def _step_mask(rules: Decoding, step: int, history: torch.Tensor) -> torch.Tensor:
    """Boolean ``(batch, vocab)`` mask of allowed tokens at ``step`` given earlier tokens."""
    batch = history.shape[0]
    if rules.skill == "query":
        allowed = torch.ones(batch, len(codec.ANSWER_VOCAB), dtype=torch.bool)
        if step == 0:
            allowed[:, codec.ANSWER_END] = False
        return allowed
    per_object = codec.TOKENS_PER_OBJECT[rules.skill]
    slot = step % per_object
    allowed = torch.ones(batch, codec.COORD_VOCAB, dtype=torch.bool)
    if slot != 0:
        allowed[:, codec.COORD_END] = False
    elif step // per_object >= rules.max_objects:
        allowed[:, : codec.COORD_BINS] = False
    if rules.skill == "detect":
        if slot < 2:
            # A minimum in the last bin would leave no room for its maximum.
            allowed[:, codec.COORD_BINS - 1] = False
        else:
            low = history[:, step - 2]
            bins = torch.arange(codec.COORD_VOCAB)
            allowed &= (bins[None, :] > low[:, None]) | (bins[None, :] == codec.COORD_END)
            allowed[:, codec.COORD_END] = False
    return allowed


@dataclass(frozen=True)
class Sample:
    """One sampled sequence and the log-probability of each of its tokens."""

    tokens: list[int]
    logprobs: list[float]


@dataclass(frozen=True)
class Task:
    """What to sample for: one request, decoded.

    Attributes:
        skill: ``"query"``, ``"point"`` or ``"detect"``.
        prompt: The question or object phrase.
        image: The request's image (``None`` for a query without one, or for an
            engine that does not read pixels).
        rules: Decoding rules from the request's settings.
        temperature: Sampling temperature (0 is greedy).
        top_p: Nucleus sampling threshold.
    """

    skill: str
    prompt: str
    image: Image.Image | None
    rules: Decoding
    temperature: float
    top_p: float

    @property
    def scoring_temperature(self) -> float:
        """Temperature the recorded log-probabilities are taken at."""
        return self.temperature if self.temperature > 0 else 1.0


class Policy(nn.Module):
    """The reference policy; see the module docstring."""

    LORA_LAYERS: tuple[str, ...] = (
        "prompt_proj",
        "film",
        "fuse",
        "init",
        "step_h",
        "step_x",
        "coord_head",
        "shift_head",
        "answer_head",
    )

    def __init__(self) -> None:
        super().__init__()
        channels = 32
        self.conv1 = nn.Conv2d(5, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.prompt_embed = nn.EmbeddingBag(codec.PROMPT_BUCKETS, 64, mode="mean")
        self.prompt_proj = nn.Linear(64, HIDDEN)
        self.film = nn.Linear(HIDDEN, 2 * channels)
        self.squeeze = nn.Conv2d(channels + 2, 16, 1)
        self.fuse = nn.Linear(16 * 8 * 8, HIDDEN)
        self.skill_embed = nn.Embedding(len(SKILL_INDEX), HIDDEN)
        self.init = nn.Linear(HIDDEN, HIDDEN)
        self.step_h = nn.Linear(HIDDEN, HIDDEN)
        self.step_x = nn.Linear(EMBED, HIDDEN)
        # Coordinate inputs: the bins, the end token and a start token.
        self.coord_embed = nn.Embedding(codec.COORD_VOCAB + 1, EMBED)
        self.answer_embed = nn.Embedding(len(codec.ANSWER_VOCAB) + 1, EMBED)
        self.slot_embed = nn.Embedding(4, EMBED)
        self.coord_head = nn.Linear(HIDDEN, codec.COORD_VOCAB)
        self.answer_head = nn.Linear(HIDDEN, len(codec.ANSWER_VOCAB))
        # Created last so the other layers' initialization does not depend on it.
        self.shift_head = nn.Linear(HIDDEN, max(codec.TOKENS_PER_OBJECT.values()))
        nn.init.zeros_(self.shift_head.weight)
        nn.init.zeros_(self.shift_head.bias)

    @property
    def lora_layers(self) -> dict[str, nn.Linear]:
        """The linear layers an adapter updates, by name."""
        layers = {name: getattr(self, name) for name in self.LORA_LAYERS}
        return {name: layer for name, layer in layers.items() if isinstance(layer, nn.Linear)}

    @staticmethod
    def _with_coordinates(features: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = features.shape
        ys = torch.linspace(-1, 1, height).view(1, 1, height, 1).expand(batch, 1, height, width)
        xs = torch.linspace(-1, 1, width).view(1, 1, 1, width).expand(batch, 1, height, width)
        return torch.cat([features, xs, ys], dim=1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(batch, 32, 8, 8)`` features of ``(batch, 3, 64, 64)`` images (no LoRA)."""
        hidden = torch.relu(self.conv1(self._with_coordinates(images)))
        hidden = torch.relu(self.conv2(hidden))
        return torch.relu(self.conv3(hidden))

    def context(
        self,
        features: torch.Tensor,
        prompts: Sequence[str],
        skill: str,
        lora: Mapping[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        """``(batch, HIDDEN)`` context of image features and prompts for one skill."""
        buckets = [codec.prompt_buckets(prompt) for prompt in prompts]
        flat = torch.tensor([bucket for row in buckets for bucket in row], dtype=torch.long)
        offsets = torch.tensor([0, *np.cumsum([len(row) for row in buckets])[:-1].tolist()])
        # EmbeddingBag gives zeros for a prompt without words, a neutral prompt.
        prompt = self.prompt_embed(flat, offsets)
        prompt = torch.tanh(lora_linear(prompt, self.prompt_proj, "prompt_proj", lora))
        gamma, beta = lora_linear(prompt, self.film, "film", lora).chunk(2, dim=1)
        modulated = torch.relu(features * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])
        squeezed = torch.relu(self.squeeze(self._with_coordinates(modulated)))
        fused = lora_linear(squeezed.flatten(1), self.fuse, "fuse", lora)
        skill_vector = self.skill_embed.weight[SKILL_INDEX[skill]]
        return torch.tanh(fused + prompt + skill_vector)

    def _start(
        self, context: torch.Tensor, lora: Mapping[str, torch.Tensor] | None
    ) -> torch.Tensor:
        return torch.tanh(lora_linear(context, self.init, "init", lora))

    def _step(
        self,
        hidden: torch.Tensor,
        previous: torch.Tensor,
        step: int,
        context: torch.Tensor,
        rules: Decoding,
        lora: Mapping[str, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance the decoder by one token; returns the new state and raw logits."""
        if rules.skill == "query":
            embedded = self.answer_embed(previous)
        else:
            slot = step % codec.TOKENS_PER_OBJECT[rules.skill]
            embedded = self.coord_embed(previous) + self.slot_embed.weight[slot]
        hidden = torch.tanh(
            lora_linear(hidden, self.step_h, "step_h", lora)
            + lora_linear(embedded, self.step_x, "step_x", lora)
            + context
        )
        if rules.skill == "query":
            logits = lora_linear(hidden, self.answer_head, "answer_head", lora)
        else:
            logits = lora_linear(hidden, self.coord_head, "coord_head", lora)
            shift = lora_linear(hidden, self.shift_head, "shift_head", lora)[:, slot]
            logits = shift_bins(logits, shift * SHIFT_UNIT)
        return hidden, logits

    @staticmethod
    def _start_token(rules: Decoding) -> int:
        return len(codec.ANSWER_VOCAB) if rules.skill == "query" else codec.COORD_VOCAB

    def log_distributions(
        self,
        context: torch.Tensor,
        tokens: torch.Tensor,
        rules: Decoding,
        temperature: float,
        lora: Mapping[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Masked, tempered log-distribution over the vocabulary before each given token.

        Args:
            context: ``(batch, HIDDEN)`` contexts.
            tokens: ``(batch, steps)`` token ids (teacher-forced), padded with any valid id.
            rules: Decoding rules of the batch.
            temperature: Softmax temperature (1 for greedy decoding).
            lora: Adapter weights, or ``None`` for the base policy.

        Returns:
            ``(batch, steps, vocab)`` log-probabilities; rows past a sequence's end are
            those of its padding.
        """
        hidden = self._start(context, lora)
        previous = torch.full((tokens.shape[0],), self._start_token(rules), dtype=torch.long)
        columns = []
        for step in range(tokens.shape[1]):
            hidden, logits = self._step(hidden, previous, step, context, rules, lora)
            mask = _step_mask(rules, step, tokens)
            columns.append(torch.log_softmax(logits.masked_fill(~mask, _MASKED) / temperature, 1))
            previous = tokens[:, step]
        return torch.stack(columns, dim=1)

    def token_logprobs(
        self,
        context: torch.Tensor,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        rules: Decoding,
        temperature: float,
        lora: Mapping[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Log-probability of each given token under the masked, tempered policy.

        Arguments are those of ``log_distributions``, plus ``lengths``, the ``(batch,)``
        number of real tokens per row.

        Returns:
            ``(batch, steps)`` log-probabilities, zero on padding.
        """
        distributions = self.log_distributions(context, tokens, rules, temperature, lora)
        return gather_tokens(distributions, tokens, lengths)

    @torch.no_grad()
    def sample(
        self,
        context: torch.Tensor,
        rules: Decoding,
        *,
        temperature: float,
        top_p: float,
        generator: torch.Generator,
        lora: Mapping[str, torch.Tensor] | None,
    ) -> list[Sample]:
        """Sample one sequence per context row.

        Temperature 0 is greedy and deterministic; recorded log-probabilities are then
        those at temperature 1. ``top_p`` keeps the smallest set of most likely tokens
        whose probability reaches it; recorded log-probabilities are of the untruncated
        tempered distribution, the one training scores.
        """
        batch = context.shape[0]
        hidden = self._start(context, lora)
        previous = torch.full((batch,), self._start_token(rules), dtype=torch.long)
        history = torch.zeros(batch, rules.max_len, dtype=torch.long)
        logprob_history = torch.zeros(batch, rules.max_len)
        lengths = torch.zeros(batch, dtype=torch.long)
        done = torch.zeros(batch, dtype=torch.bool)
        end = codec.ANSWER_END if rules.skill == "query" else codec.COORD_END
        scoring_temperature = temperature if temperature > 0 else 1.0
        for step in range(rules.max_len):
            hidden, logits = self._step(hidden, previous, step, context, rules, lora)
            masked = logits.masked_fill(~_step_mask(rules, step, history), _MASKED)
            logprobs = torch.log_softmax(masked / scoring_temperature, dim=1)
            if temperature == 0:
                chosen = masked.argmax(dim=1)
            else:
                chosen = _nucleus_sample(logprobs, top_p, generator)
            chosen = torch.where(done, torch.full_like(chosen, end), chosen)
            history[:, step] = chosen
            logprob_history[:, step] = logprobs.gather(1, chosen[:, None]).squeeze(1)
            lengths += (~done).long()
            done |= chosen == end
            previous = chosen
            if bool(done.all()):
                break
        return [
            Sample(
                history[row, : lengths[row]].tolist(), logprob_history[row, : lengths[row]].tolist()
            )
            for row in range(batch)
        ]


def gather_tokens(
    distributions: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """``(batch, steps)`` log-probabilities of ``tokens`` in ``distributions``, zero on padding."""
    chosen = distributions.gather(2, tokens[:, :, None]).squeeze(2)
    valid = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return chosen * valid


def shift_bins(logits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Move each row's bin logits towards higher bins by a fractional number of bins.

    Bin ``i`` takes the logit at position ``i - shift``, linearly interpolated between
    the two nearest bins and held at the first or last bin beyond the ends; the end
    token's logit is kept. Interpolation makes the result differentiable in ``shift``.

    Args:
        logits: ``(batch, COORD_VOCAB)`` coordinate logits.
        shift: ``(batch,)`` shifts in bins; zero leaves the logits unchanged.
    """
    bins = logits[:, : codec.COORD_BINS]
    position = (torch.arange(codec.COORD_BINS)[None, :] - shift[:, None]).clamp(
        0, codec.COORD_BINS - 1
    )
    low = position.floor().long().clamp(max=codec.COORD_BINS - 2)
    fraction = position - low
    moved = (1 - fraction) * bins.gather(1, low) + fraction * bins.gather(1, low + 1)
    return torch.cat([moved, logits[:, codec.COORD_BINS :]], dim=1)


def _nucleus_sample(
    logprobs: torch.Tensor, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    probs = logprobs.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=1, descending=True)
        # Keep a token while the mass before it is below top_p: the first always stays.
        keep = (sorted_probs.cumsum(dim=1) - sorted_probs) < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def load_base(path: Path = BASE_WEIGHTS) -> Policy:
    """The policy with its frozen base weights loaded (no network needed).

    Raises:
        FileNotFoundError: If the weights file is missing; rebuild it with
            ``python -m lightning_moondream.server.pretrain``.
    """
    if not path.exists():
        raise FileNotFoundError(
            f"base weights {path} are missing; rebuild them with "
            "`python -m lightning_moondream.server.pretrain`"
        )
    policy = Policy()
    state = torch.load(path, map_location="cpu", weights_only=True)
    policy.load_state_dict(state)
    policy.requires_grad_(False)
    return policy.eval()
