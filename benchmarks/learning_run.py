"""Does the local tuning service learn? Greedy detect reward before and after GRPO.

Everything goes through the HTTP API of the service (in-process, over
``httpx.ASGITransport``): a fresh adapter is scored greedily (temperature 0) on held-out
synthetic test scenes with the server's ground-truth reward, trained for ``--steps``
train steps of ``--groups`` groups x ``--rollouts`` rollouts at temperature 1 on
training scenes, and scored again.

    python benchmarks/learning_run.py [--seed 0] [--steps 40] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from typing import Any

import httpx

from lightning_moondream.data import synthetic
from lightning_moondream.images import encode_image
from lightning_moondream.server import create_app

BASE_URL = "http://tuning.local/v1/tuning"
HEADERS = {"X-Moondream-Auth": "learning-run"}


def detect_task(split: str, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A detect request and its ground truth for one scene (one of its phrases)."""
    scene = synthetic.make_scene(synthetic.split_seed(split, index))
    phrase, boxes = random.Random(scene.seed).choice(synthetic.detect_tasks(scene))
    request = {"skill": "detect", "object": phrase, "image_url": encode_image(scene.image)}
    truth = {
        "boxes": [
            dict(zip(("x_min", "y_min", "x_max", "y_max"), box, strict=True)) for box in boxes
        ]
    }
    return request, truth


async def rollouts(
    client: httpx.AsyncClient,
    adapter_id: str,
    request: dict[str, Any],
    truth: dict[str, Any],
    count: int,
    temperature: float,
) -> dict[str, Any]:
    body = {
        "adapter_id": adapter_id,
        "num_rollouts": count,
        "request": {**request, "settings": {"temperature": temperature}},
        "ground_truth": truth,
    }
    response = await client.post("/rollouts", json=body)
    response.raise_for_status()
    return response.json()


async def greedy_reward(
    client: httpx.AsyncClient, adapter_id: str, tasks: list[tuple[dict, dict]]
) -> float:
    results = await asyncio.gather(
        *(rollouts(client, adapter_id, req, truth, 1, 0.0) for req, truth in tasks)
    )
    return sum(result["rewards"][0] for result in results) / len(results)


async def run(
    seed: int, steps: int, groups: int, rollouts_per_group: int, eval_scenes: int
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as data_dir:
        app = create_app(data_dir=data_dir, seed=seed)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url=BASE_URL, headers=HEADERS, timeout=600
        ) as client:
            created = await client.post(
                "/adapters", json={"name": f"learning-run-{seed}", "rank": 16}
            )
            created.raise_for_status()
            adapter_id = created.json()["adapter_id"]
            held_out = [detect_task("test", index) for index in range(eval_scenes)]
            start = time.monotonic()
            before = await greedy_reward(client, adapter_id, held_out)
            rng = random.Random(seed)
            train_rewards = []
            for step in range(steps):
                tasks = [detect_task("train", rng.randrange(1_000_000)) for _ in range(groups)]
                answers = await asyncio.gather(
                    *(
                        rollouts(client, adapter_id, req, truth, rollouts_per_group, 1.0)
                        for req, truth in tasks
                    )
                )
                batch = [
                    {
                        "request": answer["request"],
                        "rollouts": answer["rollouts"],
                        "rewards": answer["rewards"],
                    }
                    for answer in answers
                ]
                train_rewards.append(
                    sum(sum(group["rewards"]) for group in batch) / (groups * rollouts_per_group)
                )
                applied = await client.post(
                    "/train_step", json={"adapter_id": adapter_id, "groups": batch}
                )
                applied.raise_for_status()
                if (step + 1) % 10 == 0:
                    recent = sum(train_rewards[-10:]) / len(train_rewards[-10:])
                    print(f"step {step + 1}/{steps}: mean sampled reward {recent:.3f}", flush=True)
            after = await greedy_reward(client, adapter_id, held_out)
            seconds = time.monotonic() - start
    return {"before": before, "after": after, "gain": after - before, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--eval-scenes", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args()
    result = asyncio.run(run(args.seed, args.steps, args.groups, args.rollouts, args.eval_scenes))
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"greedy detect reward on {args.eval_scenes} held-out scenes: "
            f"before {result['before']:.3f}, after {result['after']:.3f} "
            f"(gain {result['gain']:+.3f}) in {result['seconds']:.0f} s"
        )


if __name__ == "__main__":
    main()
