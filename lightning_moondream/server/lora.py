"""Low-rank adapters as plain tensors, and the Adam update that trains them.

An adapter is a dict of tensors (``"<layer>.A"`` of shape ``(rank, in)`` and
``"<layer>.B"`` of shape ``(out, rank)`` per adapted layer), never a module holding
them. That keeps the frozen base weights shared by every adapter and makes an update
copy-on-write: a train step builds new tensors and swaps the dict, so a rollout running
meanwhile keeps reading the old, complete one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

LoRAWeights = dict[str, torch.Tensor]


def lora_scale(rank: int) -> float:
    """Scale of the low-rank update; ``alpha = 2 * rank`` keeps it rank-independent."""
    return 2.0


def init_lora(layers: Mapping[str, nn.Linear], rank: int, seed: int) -> LoRAWeights:
    """Fresh adapter weights: ``A`` random, ``B`` zero, so the adapter starts as a no-op.

    Args:
        layers: The adapted linear layers by name.
        rank: LoRA rank.
        seed: Seed of ``A``'s initialization.
    """
    generator = torch.Generator().manual_seed(seed)
    weights: LoRAWeights = {}
    for name, layer in layers.items():
        bound = 1.0 / math.sqrt(layer.in_features)
        weights[f"{name}.A"] = (
            torch.rand(rank, layer.in_features, generator=generator) * 2 - 1
        ) * bound
        weights[f"{name}.B"] = torch.zeros(layer.out_features, rank)
    return weights


def lora_linear(
    inputs: torch.Tensor, layer: nn.Linear, name: str, lora: Mapping[str, torch.Tensor] | None
) -> torch.Tensor:
    """Apply a linear layer plus its low-rank update, if the adapter has one."""
    output = layer(inputs)
    if lora is None or f"{name}.A" not in lora:
        return output
    down = inputs @ lora[f"{name}.A"].t()
    rank = lora[f"{name}.A"].shape[0]
    return output + lora_scale(rank) * (down @ lora[f"{name}.B"].t())


@dataclass
class AdamState:
    """Adam moments of an adapter, saved with it so training resumes where it stopped.

    Attributes:
        step: Updates applied.
        exp_avg: First moments by weight name.
        exp_avg_sq: Second moments by weight name.
    """

    step: int = 0
    exp_avg: LoRAWeights = field(default_factory=dict)
    exp_avg_sq: LoRAWeights = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """Plain dict for ``torch.save``."""
        return {"step": self.step, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    @classmethod
    def from_dict(cls, state: Mapping[str, object]) -> AdamState:
        """Inverse of ``to_dict``."""
        step = state.get("step", 0)
        exp_avg = state.get("exp_avg", {})
        exp_avg_sq = state.get("exp_avg_sq", {})
        if (
            not isinstance(step, int)
            or not isinstance(exp_avg, dict)
            or not isinstance(exp_avg_sq, dict)
        ):
            raise ValueError("malformed optimizer state")
        return cls(step, dict(exp_avg), dict(exp_avg_sq))


def adam_update(
    weights: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    state: AdamState,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[LoRAWeights, AdamState]:
    """One Adam step, out of place: returns new weights and new moments.

    Nothing passed in is modified, so readers of the old weights are never disturbed.

    Args:
        weights: Current LoRA weights by name.
        grads: Their gradients (a missing one counts as zero).
        state: Adam moments before the step.
        lr: Learning rate.
        betas: Adam's moment decay rates.
        eps: Adam's denominator floor.
    """
    step = state.step + 1
    beta1, beta2 = betas
    new_weights: LoRAWeights = {}
    exp_avg: LoRAWeights = {}
    exp_avg_sq: LoRAWeights = {}
    for name, weight in weights.items():
        grad = grads.get(name)
        if grad is None:
            grad = torch.zeros_like(weight)
        first = state.exp_avg.get(name, torch.zeros_like(weight)) * beta1 + grad * (1 - beta1)
        second = state.exp_avg_sq.get(name, torch.zeros_like(weight)) * beta2 + grad.square() * (
            1 - beta2
        )
        corrected = (second / (1 - beta2**step)).sqrt() + eps
        new_weights[name] = weight - lr * (first / (1 - beta1**step)) / corrected
        exp_avg[name], exp_avg_sq[name] = first, second
    return new_weights, AdamState(step, exp_avg, exp_avg_sq)
