"""The acceptance test of the ``/finetunes`` dialect: the SDK's GRPO loop teaches the policy."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

import moondream
import pytest
from moondream.types import Base64EncodedImage
from support import serving

from lightning_moondream.server import create_app

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning_run.py"
_spec = importlib.util.spec_from_file_location("learning_run", _SCRIPT)
assert _spec is not None and _spec.loader is not None
learning_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(learning_run)


def _sdk_request(split: str, index: int, count: int, temperature: float) -> dict[str, Any]:
    request, truth = learning_run.detect_task(split, index)
    return {
        "skill": "detect",
        "image": Base64EncodedImage(image_url=request["image_url"]),
        "object": request["object"],
        "num_rollouts": count,
        "settings": {"temperature": temperature},
        "ground_truth": truth,
    }


def _greedy_reward(ft: Any, scenes: int) -> float:
    requests = ((index, _sdk_request("test", index, 1, 0.0)) for index in range(scenes))
    rewards = [answer["rewards"][0] for _, answer in ft.rollout_stream(requests, max_concurrency=4)]
    return sum(rewards) / len(rewards)


@pytest.mark.slow
def test_sdk_grpo_raises_held_out_greedy_detect_reward(tmp_path: Path) -> None:
    with serving(create_app(data_dir=tmp_path, seed=0)) as url:
        ft = moondream.ft("learning", name="sdk-learning", rank=16, endpoint=url)
        before = _greedy_reward(ft, 100)
        rng = random.Random(0)
        for _ in range(40):
            requests = [
                (None, _sdk_request("train", rng.randrange(1_000_000), 8, 1.0)) for _ in range(8)
            ]
            groups = [
                {
                    "mode": "rl",
                    "request": answer["request"],
                    "rollouts": answer["rollouts"],
                    "rewards": answer["rewards"],
                }
                for _, answer in ft.rollout_stream(requests, max_concurrency=8)
            ]
            assert ft.train_step(groups, lr=3e-3)["applied"] is True
        after = _greedy_reward(ft, 100)
    assert after - before >= 0.1, (before, after)
