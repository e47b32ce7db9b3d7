"""GRPO: group-normalized advantages and a clipped policy-gradient step on an adapter.

Each group is one request with several sampled rollouts and their rewards. A rollout's
advantage is its reward standardized within its group, ``(r - mean) / (std + eps)``;
a group whose rewards are all equal carries no signal and is skipped. The loss is
PPO's clipped surrogate on every sampled token, with the log-probabilities recorded at
sampling time as the old policy, summed over a rollout's tokens and averaged over
rollouts. One Adam step on the adapter's LoRA weights follows. Groups of one decoding
setting share a single batched forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_moondream.server.lora import AdamState, LoRAWeights, adam_update
from lightning_moondream.server.policy import Decoding, Policy

ADVANTAGE_EPS = 1e-6
"""Groups whose reward standard deviation is below this are skipped."""


@dataclass(frozen=True)
class Hyperparameters:
    """Settings of the update.

    Attributes:
        lr: Adam learning rate of the LoRA weights.
        clip: PPO clipping range of the probability ratio.
    """

    lr: float = 3e-3
    clip: float = 0.2


@dataclass(frozen=True)
class ScoredGroup:
    """One verified group, ready for the loss.

    Attributes:
        image: ``(3, 64, 64)`` input image.
        prompt: The object phrase or question.
        rules: Decoding rules the rollouts were sampled under.
        temperature: Temperature their log-probabilities were recorded at.
        tokens: Sampled tokens of each rollout.
        logprobs: Recorded log-probability of each of those tokens.
        rewards: One reward per rollout.
    """

    image: torch.Tensor
    prompt: str
    rules: Decoding
    temperature: float
    tokens: Sequence[Sequence[int]]
    logprobs: Sequence[Sequence[float]]
    rewards: Sequence[float]


@dataclass(frozen=True)
class StepResult:
    """What one train step did.

    Attributes:
        weights: The updated adapter weights (unchanged if no group carried signal).
        optimizer: The updated optimizer state.
        groups_used: Groups with non-zero reward spread.
        loss: The surrogate loss (0.0 if nothing was used).
    """

    weights: LoRAWeights
    optimizer: AdamState
    groups_used: int
    loss: float


def advantages(rewards: Sequence[float]) -> torch.Tensor | None:
    """Group-normalized advantages, or ``None`` if the rewards do not differ."""
    values = torch.tensor(rewards, dtype=torch.float32)
    std = values.std(unbiased=False)
    if len(values) < 2 or std < ADVANTAGE_EPS:
        return None
    return (values - values.mean()) / (std + ADVANTAGE_EPS)


def _padded(rows: Sequence[Sequence[float]], dtype: torch.dtype) -> torch.Tensor:
    width = max(len(row) for row in rows)
    tensor = torch.zeros(len(rows), width, dtype=dtype)
    for index, row in enumerate(rows):
        tensor[index, : len(row)] = torch.tensor(row, dtype=dtype)
    return tensor


@dataclass(frozen=True)
class _Batch:
    """Groups sharing decoding rules and temperature, stacked into one tensor batch."""

    features: torch.Tensor
    prompts: list[str]
    rows_per_group: list[int]
    rules: Decoding
    temperature: float
    tokens: torch.Tensor
    old: torch.Tensor
    lengths: torch.Tensor
    advantage: torch.Tensor


def _batches(policy: Policy, groups: Sequence[ScoredGroup]) -> list[_Batch]:
    """Stack the groups with signal; groups of one decoding setting share a forward pass."""
    buckets: dict[tuple[Decoding, float], list[tuple[ScoredGroup, torch.Tensor]]] = {}
    for group in groups:
        advantage = advantages(group.rewards)
        if advantage is not None:
            buckets.setdefault((group.rules, group.temperature), []).append((group, advantage))
    batches = []
    for (rules, temperature), members in buckets.items():
        rows = [row for group, _ in members for row in group.tokens]
        with torch.no_grad():
            # The convolutions take no LoRA, so their output is fixed for the whole step.
            features = policy.encode_images(torch.stack([group.image for group, _ in members]))
        batches.append(
            _Batch(
                features=features,
                prompts=[group.prompt for group, _ in members],
                rows_per_group=[len(group.tokens) for group, _ in members],
                rules=rules,
                temperature=temperature,
                tokens=_padded(rows, torch.long),
                old=_padded([row for group, _ in members for row in group.logprobs], torch.float32),
                lengths=torch.tensor([len(row) for row in rows]),
                advantage=torch.cat([advantage for _, advantage in members]),
            )
        )
    return batches


def _surrogate(policy: Policy, batch: _Batch, weights: LoRAWeights, clip: float) -> torch.Tensor:
    """Negative clipped surrogate of a batch, summed over its tokens and rollouts."""
    context = policy.context(batch.features, batch.prompts, batch.rules.skill, weights)
    context = context.repeat_interleave(torch.tensor(batch.rows_per_group), dim=0)
    new = policy.token_logprobs(
        context, batch.tokens, batch.lengths, batch.rules, batch.temperature, weights
    )
    valid = torch.arange(batch.tokens.shape[1])[None, :] < batch.lengths[:, None]
    ratio = torch.exp((new - batch.old) * valid)
    advantage = batch.advantage[:, None]
    objective = torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
    return -(objective * valid).sum()


def train_step(
    policy: Policy,
    weights: LoRAWeights,
    optimizer: AdamState,
    groups: Sequence[ScoredGroup],
    hyperparameters: Hyperparameters,
) -> StepResult:
    """Apply one GRPO step to an adapter, out of place.

    Args:
        policy: The frozen base policy.
        weights: The adapter's current LoRA weights (not modified).
        optimizer: The adapter's Adam state (not modified).
        groups: Scored groups of any skills.
        hyperparameters: Learning rate and clipping.
    """
    batches = _batches(policy, groups)
    if not batches:
        return StepResult(dict(weights), optimizer, 0, 0.0)
    rollouts = sum(len(batch.lengths) for batch in batches)
    used = sum(len(batch.rows_per_group) for batch in batches)
    trainable = {
        name: tensor.detach().clone().requires_grad_(True) for name, tensor in weights.items()
    }
    loss = (
        sum(
            (_surrogate(policy, batch, trainable, hyperparameters.clip) for batch in batches),
            torch.zeros(()),
        )
        / rollouts
    )
    names = list(trainable)
    grads = torch.autograd.grad(loss, [trainable[name] for name in names], allow_unused=True)
    gradients = {name: grad for name, grad in zip(names, grads, strict=True) if grad is not None}
    new_weights, new_optimizer = adam_update(weights, gradients, optimizer, lr=hyperparameters.lr)
    return StepResult(new_weights, new_optimizer, used, float(loss.detach()))
