"""One train step on an adapter: GRPO on scored rollouts plus supervised targets.

RL groups are one request with several sampled rollouts and their rewards. A rollout's
advantage is its reward standardized within its group, ``(r - mean) / (std + eps)``;
a group whose rewards are all equal carries no signal and is skipped. Their loss is
PPO's clipped surrogate on every sampled token, with the log-probabilities recorded at
sampling time as the old policy, summed over a rollout's tokens and averaged over
rollouts.

Supervised (SFT) groups are one request and the target answer's tokens; their loss is
the target's negative log-likelihood (temperature 1), summed over its tokens and
averaged over targets. Both losses are added and one Adam step on the adapter's LoRA
weights follows, so one step can mix both kinds. Rows of one decoding setting share a
single batched forward pass.

The step reports what it did: the KL divergence from the pre-step to the post-step
policy, exact over the vocabulary at every position of the rows it trained on (summed
over a row's tokens, averaged over rows), the gradient's global L2 norm and the mean
target NLL before the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from lightning_moondream.server.lora import AdamState, LoRAWeights, adam_update
from lightning_moondream.server.policy import Decoding, Policy, Task, gather_tokens, image_tensor

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


RequestT = TypeVar("RequestT")
"""The form a group's request is in: verified, then decoded into a ``Task`` to train on."""


@dataclass(frozen=True)
class RLGroup(Generic[RequestT]):
    """One RL group: a request, the rollouts sampled for it and their rewards.

    Attributes:
        request: The request.
        tokens: Sampled tokens of each rollout.
        logprobs: Recorded log-probability of each of those tokens.
        rewards: One reward per rollout.
    """

    request: RequestT
    tokens: Sequence[Sequence[int]]
    logprobs: Sequence[Sequence[float]]
    rewards: Sequence[float]


@dataclass(frozen=True)
class SFTGroup(Generic[RequestT]):
    """One supervised group: a request and the tokens of its target answer, end token included."""

    request: RequestT
    tokens: Sequence[int]


@dataclass(frozen=True)
class TrainGroups(Generic[RequestT]):
    """The groups of one train step, by mode, each mode in the order sent."""

    rl: list[RLGroup[RequestT]] = field(default_factory=list)
    sft: list[SFTGroup[RequestT]] = field(default_factory=list)

    @property
    def rewards(self) -> list[float]:
        """Every reward of the RL groups, in order."""
        return [reward for group in self.rl for reward in group.rewards]


@dataclass(frozen=True)
class StepResult:
    """What one train step did.

    Attributes:
        weights: The updated adapter weights (unchanged if no group carried signal).
        optimizer: The updated optimizer state.
        groups_used: Groups that entered the loss (RL groups with reward spread, and
            every supervised group).
        loss: The loss the step descended (0.0 if nothing was used).
        kl: KL divergence from the pre-step to the post-step policy on the rows trained on.
        grad_norm: Global L2 norm of the loss gradient.
        sft_loss: Mean target NLL before the step, ``None`` without supervised groups.
    """

    weights: LoRAWeights
    optimizer: AdamState
    groups_used: int
    loss: float
    kl: float
    grad_norm: float
    sft_loss: float | None


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
    """Rows sharing decoding rules and temperature, stacked into one tensor batch.

    ``advantage`` and ``old`` are ``None`` for a batch of supervised targets.
    """

    features: torch.Tensor
    prompts: list[str]
    rows_per_group: list[int]
    rules: Decoding
    temperature: float
    tokens: torch.Tensor
    lengths: torch.Tensor
    old: torch.Tensor | None = None
    advantage: torch.Tensor | None = None

    def contexts(self, policy: Policy, weights: LoRAWeights) -> torch.Tensor:
        """One context row per token row."""
        context = policy.context(self.features, self.prompts, self.rules.skill, weights)
        return context.repeat_interleave(torch.tensor(self.rows_per_group), dim=0)

    def distributions(self, policy: Policy, weights: LoRAWeights) -> torch.Tensor:
        """``(rows, steps, vocab)`` log-distributions of the batch under ``weights``."""
        return policy.log_distributions(
            self.contexts(policy, weights), self.tokens, self.rules, self.temperature, weights
        )

    @property
    def valid(self) -> torch.Tensor:
        """``(rows, steps)`` mask of real tokens."""
        return torch.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]


def _rl_batches(policy: Policy, groups: Sequence[RLGroup[Task]]) -> list[_Batch]:
    """Stack the groups with signal; groups of one decoding setting share a forward pass.

    A group's log-probabilities were recorded at its request's scoring temperature.
    """
    buckets: dict[tuple[Decoding, float], list[tuple[RLGroup[Task], torch.Tensor]]] = {}
    for group in groups:
        advantage = advantages(group.rewards)
        if advantage is not None:
            setting = (group.request.rules, group.request.scoring_temperature)
            buckets.setdefault(setting, []).append((group, advantage))
    batches = []
    for (rules, temperature), members in buckets.items():
        rows = [row for group, _ in members for row in group.tokens]
        with torch.no_grad():
            # The convolutions take no LoRA, so their output is fixed for the whole step.
            features = policy.encode_images(
                torch.stack([image_tensor(group.request.image) for group, _ in members])
            )
        batches.append(
            _Batch(
                features=features,
                prompts=[group.request.prompt for group, _ in members],
                rows_per_group=[len(group.tokens) for group, _ in members],
                rules=rules,
                temperature=temperature,
                tokens=_padded(rows, torch.long),
                lengths=torch.tensor([len(row) for row in rows]),
                old=_padded([row for group, _ in members for row in group.logprobs], torch.float32),
                advantage=torch.cat([advantage for _, advantage in members]),
            )
        )
    return batches


def _target_batches(policy: Policy, groups: Sequence[SFTGroup[Task]]) -> list[_Batch]:
    """Stack supervised targets; targets of one decoding setting share a forward pass."""
    buckets: dict[Decoding, list[SFTGroup[Task]]] = {}
    for group in groups:
        buckets.setdefault(group.request.rules, []).append(group)
    batches = []
    for rules, members in buckets.items():
        with torch.no_grad():
            features = policy.encode_images(
                torch.stack([image_tensor(group.request.image) for group in members])
            )
        batches.append(
            _Batch(
                features=features,
                prompts=[group.request.prompt for group in members],
                rows_per_group=[1] * len(members),
                rules=rules,
                temperature=1.0,
                tokens=_padded([group.tokens for group in members], torch.long),
                lengths=torch.tensor([len(group.tokens) for group in members]),
            )
        )
    return batches


def _surrogate(batch: _Batch, distributions: torch.Tensor, clip: float) -> torch.Tensor:
    """Negative clipped surrogate of an RL batch, summed over its tokens and rollouts."""
    assert batch.old is not None and batch.advantage is not None
    new = gather_tokens(distributions, batch.tokens, batch.lengths)
    valid = batch.valid
    ratio = torch.exp((new - batch.old) * valid)
    advantage = batch.advantage[:, None]
    objective = torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
    return -(objective * valid).sum()


def _kl(before: torch.Tensor, after: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(before || after) summed over the valid positions of every row."""
    per_position = (before.exp() * (before - after)).sum(dim=2)
    return (per_position * valid).sum()


def train_step(
    policy: Policy,
    weights: LoRAWeights,
    optimizer: AdamState,
    groups: TrainGroups[Task],
    hyperparameters: Hyperparameters,
    lr: float | None = None,
) -> StepResult:
    """Apply one train step to an adapter, out of place.

    Args:
        policy: The frozen base policy.
        weights: The adapter's current LoRA weights (not modified).
        optimizer: The adapter's Adam state (not modified).
        groups: RL and supervised groups of any skills.
        hyperparameters: Default learning rate and clipping.
        lr: Learning rate of this step; ``hyperparameters.lr`` if ``None``. At 0 the
            weights stay exactly as they are.
    """
    rl_batches = _rl_batches(policy, groups.rl)
    target_batches = _target_batches(policy, groups.sft)
    if not rl_batches and not target_batches:
        return StepResult(dict(weights), optimizer, 0, 0.0, 0.0, 0.0, None)
    trainable = {
        name: tensor.detach().clone().requires_grad_(True) for name, tensor in weights.items()
    }
    batches = rl_batches + target_batches
    before = [batch.distributions(policy, trainable) for batch in batches]
    loss, sft_loss = _loss(rl_batches, target_batches, before, hyperparameters.clip)
    gradients, grad_norm = _gradients(loss, trainable)
    step_lr = hyperparameters.lr if lr is None else lr
    new_weights, new_optimizer = adam_update(weights, gradients, optimizer, lr=step_lr)
    kl = _mean_kl(policy, batches, before, new_weights)
    used = sum(len(batch.rows_per_group) for batch in batches)
    return StepResult(
        new_weights,
        new_optimizer,
        used,
        float(loss.detach()),
        max(0.0, kl),
        grad_norm,
        sft_loss,
    )


def _loss(
    rl_batches: Sequence[_Batch],
    target_batches: Sequence[_Batch],
    before: Sequence[torch.Tensor],
    clip: float,
) -> tuple[torch.Tensor, float | None]:
    """The step's loss, and its SFT part (``None`` without targets).

    ``before`` holds the distributions of the RL batches, then of the target batches.
    """
    loss = torch.zeros(())
    sft_loss = None
    if rl_batches:
        rollouts = sum(len(batch.lengths) for batch in rl_batches)
        surrogate = sum(
            (
                _surrogate(batch, dist, clip)
                for batch, dist in zip(rl_batches, before, strict=False)
            ),
            torch.zeros(()),
        )
        loss = loss + surrogate / rollouts
    if target_batches:
        targets = sum(len(batch.lengths) for batch in target_batches)
        nll = (
            -sum(
                (
                    gather_tokens(dist, batch.tokens, batch.lengths).sum()
                    for batch, dist in zip(target_batches, before[len(rl_batches) :], strict=True)
                ),
                torch.zeros(()),
            )
            / targets
        )
        loss = loss + nll
        sft_loss = float(nll.detach())
    return loss, sft_loss


def _gradients(
    loss: torch.Tensor, trainable: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], float]:
    """The loss's gradient for each trainable weight it depends on, and their global norm."""
    names = list(trainable)
    grads = torch.autograd.grad(loss, [trainable[name] for name in names], allow_unused=True)
    gradients = {name: grad for name, grad in zip(names, grads, strict=True) if grad is not None}
    grad_norm = float(
        torch.sqrt(sum((grad.pow(2).sum() for grad in gradients.values()), torch.zeros(())))
    )
    return gradients, grad_norm


def _mean_kl(
    policy: Policy,
    batches: Sequence[_Batch],
    before: Sequence[torch.Tensor],
    weights: LoRAWeights,
) -> float:
    """KL from the pre-step to the post-step policy, averaged over the rows."""
    with torch.no_grad():
        rows = sum(len(batch.lengths) for batch in batches)
        kl = (
            sum(
                (
                    _kl(dist.detach(), batch.distributions(policy, weights), batch.valid)
                    for batch, dist in zip(batches, before, strict=True)
                ),
                torch.zeros(()),
            )
            / rows
        )
    return float(kl)
