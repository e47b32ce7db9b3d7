"""The reference policy's shift of coordinate logits, the adapters' handle on shared errors."""

from __future__ import annotations

import torch

from lightning_moondream.server import codec
from lightning_moondream.server.policy import load_base, shift_bins


def _logits() -> torch.Tensor:
    return torch.randn(3, codec.COORD_VOCAB, generator=torch.Generator().manual_seed(0))


def test_zero_shift_leaves_logits_unchanged() -> None:
    logits = _logits()
    assert torch.equal(shift_bins(logits, torch.zeros(3)), logits)


def test_whole_and_fractional_shifts_move_the_bins_and_keep_the_end_token() -> None:
    logits = _logits()
    moved = shift_bins(logits, torch.tensor([2.0, -1.0, 0.5]))
    assert torch.allclose(moved[0, 2 : codec.COORD_BINS], logits[0, : codec.COORD_BINS - 2])
    # Beyond the first bin the first bin's logit is held.
    assert torch.allclose(moved[0, :2], logits[0, :1].expand(2))
    assert torch.allclose(moved[1, : codec.COORD_BINS - 1], logits[1, 1 : codec.COORD_BINS])
    halfway = (logits[2, : codec.COORD_BINS - 1] + logits[2, 1 : codec.COORD_BINS]) / 2
    assert torch.allclose(moved[2, 1 : codec.COORD_BINS], halfway)
    assert torch.equal(moved[:, codec.COORD_END], logits[:, codec.COORD_END])


def test_shift_is_differentiable() -> None:
    shift = torch.zeros(3, requires_grad=True)
    shift_bins(_logits(), shift)[:, 5].sum().backward()
    assert shift.grad is not None
    assert bool((shift.grad != 0).all())


def test_base_policy_does_not_shift() -> None:
    policy = load_base()
    assert not policy.shift_head.weight.any()
    assert not policy.shift_head.bias.any()
