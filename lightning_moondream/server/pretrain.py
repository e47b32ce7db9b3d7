"""Rebuild the reference policy's base weights by supervised training on synthetic scenes.

``python -m lightning_moondream.server.pretrain`` writes ``server/weights/base.pt``. The
run is seeded and single-threaded per step order, so it is repeatable on one machine.

RL needs a base that already has some skill but leaves clear headroom (greedy detect
reward about 0.43 on held-out scenes). Two choices give it: training stops early, and
detect targets are loose, padded by ``--box-padding`` (0.06) on every side as a sloppy
annotator would draw them. The base thus learns to find objects but draws its boxes too
large; the IoU reward of GRPO pays for tighter boxes, an error RL can correct quickly.
The policy's shift head is not trained here and stays zero: it is the adapters' handle
for such shared errors (see ``policy.py``), and the base policy does not shift.
"""

from __future__ import annotations

import argparse
import io
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from lightning_moondream.data import synthetic
from lightning_moondream.rewards import detect_reward
from lightning_moondream.server import codec
from lightning_moondream.server.policy import BASE_WEIGHTS, Decoding, Policy, image_tensor

SKILL_WEIGHTS = {"detect": 0.5, "point": 0.25, "query": 0.25}


@dataclass(frozen=True)
class Task:
    """One supervised example: scene index, prompt and target tokens."""

    scene: int
    prompt: str
    tokens: tuple[int, ...]


def _as_sent(image: Image.Image) -> Image.Image:
    # Clients send JPEG; train on what the service will see.
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _padded_box(
    box: tuple[float, float, float, float], padding: float
) -> tuple[float, float, float, float]:
    x_min, y_min, x_max, y_max = box
    return (
        max(0.0, x_min - padding),
        max(0.0, y_min - padding),
        min(1.0, x_max + padding),
        min(1.0, y_max + padding),
    )


def build_tasks(
    scenes: Sequence[synthetic.Scene], box_padding: float = 0.0
) -> dict[str, list[Task]]:
    """Supervised tasks of every skill for a list of scenes.

    Args:
        scenes: The scenes.
        box_padding: Margin added to every side of detect target boxes (normalized).
    """
    tasks: dict[str, list[Task]] = {"detect": [], "point": [], "query": []}
    for index, scene in enumerate(scenes):
        for phrase, boxes in synthetic.detect_tasks(scene):
            loose = [_padded_box(box, box_padding) for box in boxes]
            tasks["detect"].append(Task(index, phrase, tuple(codec.encode_boxes(loose))))
        for phrase, points in synthetic.point_tasks(scene):
            tasks["point"].append(Task(index, phrase, tuple(codec.encode_points(points))))
        for question, answers in synthetic.query_tasks(scene):
            tasks["query"].append(Task(index, question, tuple(codec.encode_answer(answers[0]))))
    return tasks


def _batch(policy: Policy, images: torch.Tensor, skill: str, batch: Sequence[Task]) -> torch.Tensor:
    """Mean negative log-likelihood of a batch of tasks of one skill."""
    steps = max(len(task.tokens) for task in batch)
    tokens = torch.zeros(len(batch), steps, dtype=torch.long)
    for row, task in enumerate(batch):
        tokens[row, : len(task.tokens)] = torch.tensor(task.tokens)
    lengths = torch.tensor([len(task.tokens) for task in batch])
    features = policy.encode_images(images[[task.scene for task in batch]])
    context = policy.context(features, [task.prompt for task in batch], skill, None)
    rules = Decoding(skill, steps, 16)
    logprobs = policy.token_logprobs(context, tokens, lengths, rules, 1.0, None)
    return -logprobs.sum() / lengths.sum()


def greedy_detect_reward(policy: Policy, split: str, count: int) -> float:
    """Mean greedy detect reward of the base policy over the first phrase-task of scenes."""
    rewards = []
    generator = torch.Generator()
    for index in range(count):
        scene = synthetic.make_scene(synthetic.split_seed(split, index))
        rng = random.Random(scene.seed)
        phrase, boxes = rng.choice(synthetic.detect_tasks(scene))
        features = policy.encode_images(image_tensor(_as_sent(scene.image))[None])
        context = policy.context(features, [phrase], "detect", None)
        sample = policy.sample(
            context,
            Decoding.for_request("detect", 256, None),
            temperature=0.0,
            top_p=1.0,
            generator=generator,
            lora=None,
        )[0]
        rewards.append(detect_reward(codec.decode("detect", sample.tokens)["boxes"], boxes))
    return sum(rewards) / len(rewards)


def pretrain(
    *,
    steps: int,
    scenes: int,
    seed: int,
    box_padding: float = 0.0,
    batch_size: int = 64,
    lr: float = 3e-3,
    log: Callable[[str], None] = print,
) -> Policy:
    """Train a fresh policy on synthetic train scenes.

    Args:
        steps: Optimizer steps.
        scenes: Number of training scenes.
        seed: Seed of initialization and batch order.
        box_padding: Margin added to detect target boxes (see ``build_tasks``).
        batch_size: Tasks per step (one skill per step).
        lr: Adam learning rate.
        log: Where progress lines go.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    policy = Policy()
    scene_list = [
        synthetic.make_scene(synthetic.split_seed("train", index)) for index in range(scenes)
    ]
    images = torch.stack([image_tensor(_as_sent(scene.image)) for scene in scene_list])
    tasks = build_tasks(scene_list, box_padding)
    log(
        f"{scenes} scenes, "
        + ", ".join(f"{len(items)} {skill} tasks" for skill, items in tasks.items())
    )
    policy.shift_head.requires_grad_(False)
    optimizer = torch.optim.Adam(
        [parameter for parameter in policy.parameters() if parameter.requires_grad], lr=lr
    )
    skills, weights = list(SKILL_WEIGHTS), list(SKILL_WEIGHTS.values())
    start = time.monotonic()
    running = 0.0
    for step in range(1, steps + 1):
        skill = rng.choices(skills, weights)[0]
        batch = rng.sample(tasks[skill], batch_size)
        loss = _batch(policy, images, skill, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 200 == 0 or step == steps:
            log(f"step {step}/{steps} loss {running:.3f} ({time.monotonic() - start:.0f} s)")
    policy.requires_grad_(False)
    return policy.eval()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: train the base policy and write its weights."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--box-padding", type=float, default=0.06)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=BASE_WEIGHTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    policy = pretrain(
        steps=args.steps, scenes=args.scenes, seed=args.seed, box_padding=args.box_padding
    )
    reward = greedy_detect_reward(policy, "val", 200)
    print(f"greedy detect reward on 200 validation scenes: {reward:.3f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(policy.state_dict(), args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
