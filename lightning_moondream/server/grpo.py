"""GRPO: group-normalized advantages and a clipped policy-gradient step on an adapter.

Each group is one request with several sampled rollouts and their rewards. A rollout's
advantage is its reward standardized within its group, ``(r - mean) / (std + eps)``;
a group whose rewards are all equal carries no signal and is skipped. The loss is
PPO's clipped surrogate on every sampled token, with the log-probabilities recorded at
sampling time as the old policy, summed over a rollout's tokens and averaged over
rollouts. One Adam step on the adapter's LoRA weights follows.
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
    trainable = {
        name: tensor.detach().clone().requires_grad_(True) for name, tensor in weights.items()
    }
    total = torch.zeros(())
    rollouts = 0
    used = 0
    for group in groups:
        advantage = advantages(group.rewards)
        if advantage is None:
            continue
        used += 1
        rollouts += len(group.rewards)
        with torch.no_grad():
            features = policy.encode_images(group.image[None])
        context = policy.context(features, [group.prompt], group.rules.skill, trainable)
        tokens = _padded(group.tokens, torch.long)
        old = _padded(group.logprobs, torch.float32)
        lengths = torch.tensor([len(row) for row in group.tokens])
        new = policy.token_logprobs(
            context.expand(len(group.tokens), -1),
            tokens,
            lengths,
            group.rules,
            group.temperature,
            trainable,
        )
        valid = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
        ratio = torch.exp((new - old) * valid)
        clipped = ratio.clamp(1 - hyperparameters.clip, 1 + hyperparameters.clip)
        objective = torch.minimum(ratio * advantage[:, None], clipped * advantage[:, None])
        total = total - (objective * valid).sum()
    if used == 0:
        return StepResult(dict(weights), optimizer, 0, 0.0)
    loss = total / rollouts
    names = list(trainable)
    grads = torch.autograd.grad(loss, [trainable[name] for name in names], allow_unused=True)
    gradients = {name: grad for name, grad in zip(names, grads, strict=True) if grad is not None}
    new_weights, new_optimizer = adam_update(weights, gradients, optimizer, lr=hyperparameters.lr)
    return StepResult(new_weights, new_optimizer, used, float(loss.detach()))
