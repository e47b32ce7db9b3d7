"""Verification of a train step's groups: shapes, requests, signatures, rewards, targets.

Groups are checked in order, each in full before the next: its shape (an object, a
known ``mode`` and only that mode's fields), then an RL group's request, rollout
signatures and rewards, or an SFT group's request and target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_moondream.api.models import check_rewards
from lightning_moondream.server import signing
from lightning_moondream.server.errors import ServiceError
from lightning_moondream.server.grpo import RLGroup, SFTGroup, TrainGroups
from lightning_moondream.server.policy import Task
from lightning_moondream.server.sampling import decoding_rules
from lightning_moondream.server.targets import target_tokens
from lightning_moondream.server.validation import (
    ParsedRequest,
    group_mode,
    parse_skill_request,
    rollout_fields,
)


def engine_groups(
    verified: TrainGroups[ParsedRequest], task: Callable[[ParsedRequest], Task]
) -> TrainGroups[Task]:
    """A verified step's groups with their requests decoded, for the engine.

    Args:
        verified: The step's verified groups.
        task: Decodes a request into the engine's task (its image included).
    """
    return TrainGroups(
        rl=[
            RLGroup(task(group.request), group.tokens, group.logprobs, group.rewards)
            for group in verified.rl
        ],
        sft=[SFTGroup(task(group.request), group.tokens) for group in verified.sft],
    )


def verify_groups(
    groups: Sequence[Any], secret: bytes, adapter_id: str, max_pixels: int
) -> TrainGroups[ParsedRequest]:
    """Verify a train step's groups for an adapter, in order.

    Args:
        groups: The body's groups as sent.
        secret: The key rollouts were signed with.
        adapter_id: The adapter the rollouts must have been sampled from.
        max_pixels: Largest decoded image accepted.

    Raises:
        ServiceError: 422 naming a bad group field, 400 for a changed or foreign rollout
            or an unreadable image.
    """
    verified: TrainGroups[ParsedRequest] = TrainGroups()
    for index, group in enumerate(groups):
        where = f"groups[{index}]"
        if group_mode(group, where) == "rl":
            verified.rl.append(verify_rl_group(group, where, secret, adapter_id, max_pixels))
        else:
            verified.sft.append(supervised_group(group, where, max_pixels))
    return verified


def verify_rl_group(
    group: Mapping[str, Any], where: str, secret: bytes, adapter_id: str, max_pixels: int
) -> RLGroup[ParsedRequest]:
    """Check an RL group's request, rollouts (signatures) and rewards.

    Raises:
        ServiceError: 422 naming a bad field, 400 for a changed or foreign rollout.
    """
    request, rollouts = group.get("request"), group.get("rollouts")
    parsed = parse_skill_request(request, f"{where}.request", max_pixels)
    assert isinstance(request, dict)
    if not isinstance(rollouts, list) or not rollouts:
        raise ServiceError(
            422, f"{where}.rollouts: must be the non-empty list of rollouts received"
        )
    try:
        rewards = check_rewards(group.get("rewards"), len(rollouts), where=f"{where}.rewards")
    except ValueError as exc:
        raise ServiceError(422, str(exc)) from exc
    digest = signing.request_digest(request)
    all_tokens, all_logprobs = [], []
    for number, rollout in enumerate(rollouts):
        place = f"{where}.rollouts[{number}]"
        tokens, logprobs, signature = rollout_fields(rollout, place)
        if rollout.get("skill") != parsed.skill or not signing.verify_rollout(
            secret, adapter_id, digest, tokens, logprobs, signature
        ):
            raise ServiceError(
                400,
                f"{place}: signature mismatch; the rollout was changed, or was sampled for "
                "another adapter or request",
            )
        all_tokens.append(tokens)
        all_logprobs.append(logprobs)
    return RLGroup(parsed, all_tokens, all_logprobs, rewards)


def supervised_group(
    group: Mapping[str, Any], where: str, max_pixels: int
) -> SFTGroup[ParsedRequest]:
    """Check an SFT group's request and target; the target as tokens.

    Raises:
        ServiceError: 422 naming a bad or missing field.
    """
    parsed = parse_skill_request(group.get("request"), f"{where}.request", max_pixels)
    if "target" not in group:
        raise ServiceError(422, f"{where}.target: required for an sft group")
    try:
        tokens = target_tokens(parsed.skill, group["target"], decoding_rules(parsed))
    except ValueError as exc:
        raise ServiceError(422, f"{where}.target: {exc}") from exc
    return SFTGroup(parsed, tokens)
