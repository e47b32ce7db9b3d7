"""Policies the service can run: the learning reference policy and a no-compute one.

An engine owns the model side of the service: it makes fresh adapter states, samples
token sequences for a request and applies a train step to a state. Adapter states are
immutable values; a train step returns a new one, which the service swaps in.

- ``"reference"``: the small torch policy of ``policy.py`` with LoRA adapters, trained
  by GRPO and supervised targets (``grpo.py``).
- ``"constant"``: always the same valid answer, with valid training metadata; train
  steps are counted but optimize nothing, and report no loss statistics. It costs no model compute and never decodes
  an image (its header is still checked), so client-side benchmarks measure the client
  and the wire, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lightning_moondream.server import codec
from lightning_moondream.server.grpo import Hyperparameters, TrainGroups, train_step
from lightning_moondream.server.lora import AdamState, LoRAWeights, init_lora
from lightning_moondream.server.policy import Policy, Sample, Task, image_tensor, load_base

POLICIES: tuple[str, ...] = ("reference", "constant")


@dataclass(frozen=True)
class AdapterState:
    """An adapter's weights and optimizer state at one point in time.

    Attributes:
        rank: LoRA rank.
        weights: LoRA tensors by name (empty for the constant policy).
        optimizer: Adam moments, saved with the adapter so training resumes smoothly.
    """

    rank: int
    weights: LoRAWeights = field(default_factory=dict)
    optimizer: AdamState = field(default_factory=AdamState)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for a weight file."""
        return {"rank": self.rank, "weights": self.weights, "optimizer": self.optimizer.to_dict()}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> AdapterState:
        """Inverse of ``to_dict``.

        Raises:
            ValueError: If the dict is not an adapter state.
        """
        rank, weights, optimizer = state.get("rank"), state.get("weights"), state.get("optimizer")
        if (
            not isinstance(rank, int)
            or not isinstance(weights, dict)
            or not isinstance(optimizer, dict)
        ):
            raise ValueError("malformed adapter state")
        return cls(rank, dict(weights), AdamState.from_dict(optimizer))


@dataclass(frozen=True)
class StepStats:
    """Quantities of one applied update (``None`` where the policy computes none).

    Attributes:
        kl: KL divergence from the pre-step to the post-step policy on the step's rows.
        grad_norm: Global L2 norm of the loss gradient.
        sft_loss: Mean target NLL before the step; ``None`` without SFT groups.
    """

    kl: float | None = None
    grad_norm: float | None = None
    sft_loss: float | None = None


class Engine(Protocol):
    """What the service needs from a policy."""

    reads_pixels: bool
    """Whether ``sample`` and ``train`` look at the image; if not, it is never decoded."""

    def new_adapter(self, rank: int, seed: int) -> AdapterState:
        """A fresh adapter state of a rank."""

    def sample(
        self, state: AdapterState, task: Task, count: int, generator: torch.Generator
    ) -> list[Sample]:
        """Sample ``count`` sequences for a task."""

    def train(
        self, state: AdapterState, groups: TrainGroups[Task], lr: float | None = None
    ) -> tuple[AdapterState, StepStats]:
        """Apply one train step at ``lr`` (the engine's default if ``None``).

        Returns:
            The new state and the step's statistics.
        """


class ReferenceEngine:
    """The torch reference policy with per-adapter LoRA, trained by GRPO."""

    reads_pixels = True

    def __init__(
        self, policy: Policy | None = None, hyperparameters: Hyperparameters | None = None
    ) -> None:
        self.policy = policy if policy is not None else load_base()
        self.hyperparameters = hyperparameters or Hyperparameters()

    def new_adapter(self, rank: int, seed: int) -> AdapterState:
        """A fresh adapter: LoRA ``B`` zero, so it starts exactly as the base policy."""
        return AdapterState(rank, init_lora(self.policy.lora_layers, rank, seed))

    def _context(self, state: AdapterState, task: Task) -> torch.Tensor:
        features = self.policy.encode_images(image_tensor(task.image)[None])
        return self.policy.context(features, [task.prompt], task.skill, state.weights)

    def sample(
        self, state: AdapterState, task: Task, count: int, generator: torch.Generator
    ) -> list[Sample]:
        """Sample ``count`` sequences, all from one encoding of the image and prompt."""
        with torch.no_grad():
            context = self._context(state, task)
        return self.policy.sample(
            context.expand(count, -1),
            task.rules,
            temperature=task.temperature,
            top_p=task.top_p,
            generator=generator,
            lora=state.weights,
        )

    def train(
        self, state: AdapterState, groups: TrainGroups[Task], lr: float | None = None
    ) -> tuple[AdapterState, StepStats]:
        """One step on the adapter's LoRA weights: GRPO on the RL groups, NLL on the SFT ones."""
        result = train_step(
            self.policy, state.weights, state.optimizer, groups, self.hyperparameters, lr=lr
        )
        stats = StepStats(result.kl, result.grad_norm, result.sft_loss)
        return AdapterState(state.rank, result.weights, result.optimizer), stats


class ConstantEngine:
    """Always the same valid answer; train steps change nothing but the step count."""

    reads_pixels = False

    _ANSWER = [codec.ANSWER_VOCAB.index("yes"), codec.ANSWER_END]
    _POINT = [codec.COORD_BINS // 2, codec.COORD_BINS // 2, codec.COORD_END]
    _BOX = [
        codec.COORD_BINS // 4,
        codec.COORD_BINS // 4,
        3 * codec.COORD_BINS // 4,
        3 * codec.COORD_BINS // 4,
    ]

    def new_adapter(self, rank: int, seed: int) -> AdapterState:
        """An empty adapter state of a rank."""
        return AdapterState(rank)

    def sample(
        self, state: AdapterState, task: Task, count: int, generator: torch.Generator
    ) -> list[Sample]:
        """The fixed answer, cut to ``max_tokens``, with log-probability 0 per token."""
        if task.skill == "query":
            tokens = self._ANSWER
        elif task.skill == "point":
            tokens = self._POINT
        else:
            tokens = [*self._BOX, codec.COORD_END]
        tokens = tokens[: task.rules.max_len]
        return [Sample(list(tokens), [0.0] * len(tokens)) for _ in range(count)]

    def train(
        self, state: AdapterState, groups: TrainGroups[Task], lr: float | None = None
    ) -> tuple[AdapterState, StepStats]:
        """Count the step in the optimizer state; weights stay as they are."""
        optimizer = AdamState(
            state.optimizer.step + 1, state.optimizer.exp_avg, state.optimizer.exp_avg_sq
        )
        return AdapterState(state.rank, state.weights, optimizer), StepStats()


def make_engine(policy: str) -> Engine:
    """The engine of a policy name.

    Raises:
        ValueError: For a name outside ``POLICIES``.
    """
    if policy == "reference":
        return ReferenceEngine()
    if policy == "constant":
        return ConstantEngine()
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
