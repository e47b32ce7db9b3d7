"""The project's training loop against Moondream's SDK loop, on one ``serve``.

``lightning-moondream serve`` runs in a child process over HTTP on 127.0.0.1 with the
no-compute ``constant`` policy and injected latency (rollouts 200 ms, train step
500 ms), serving both API dialects over one store. Each step is a batch of 32 requests
x 8 rollouts, then one train step on them:

- project: ``AsyncTuningClient.rollouts_many`` (all 32 in flight) and ``train_step``,
  the next batch's rollouts sampled while the step is applied (staleness 1, as
  ``MoondreamRLModule`` does by default);
- SDK at its defaults: one ``Finetune.rollout_stream`` over all requests
  (``max_concurrency=4``, ``buffer_size=8``), ``train_step`` every 32 answers;
- SDK at equal concurrency: the same with ``max_concurrency=32``.

Step time is the median interval between consecutive train step ends after a warm-up.

Run: ``python benchmarks/bench_vs_sdk.py [--steps 6]``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import moondream
from common import print_table, serve_http, write_results
from moondream.types import Base64EncodedImage

from lightning_moondream.api import AsyncTuningClient
from lightning_moondream.api.client import RolloutCall
from lightning_moondream.data import synthetic
from lightning_moondream.images import encode_image

BATCH, ROLLOUTS = 32, 8
KEY = "bench-vs-sdk"
LATENCY = ("--latency", "rollouts=0.2", "--latency", "train_step=0.5")
REWARDS = [float(index % 2) for index in range(ROLLOUTS)]


def _images() -> list[str]:
    return [
        encode_image(synthetic.make_scene(synthetic.split_seed("train", index)).image)
        for index in range(BATCH)
    ]


def _intervals(ends: list[float]) -> float:
    # The first step is the warm-up.
    return statistics.median(b - a for a, b in itertools.pairwise(ends[1:]))


async def project_loop(base_url: str, images: list[str], steps: int) -> float:
    """Median step seconds of the project's loop, rollouts overlapping the train step."""
    async with AsyncTuningClient(api_key=KEY, base_url=base_url) as client:
        adapter = await client.adapters.create("bench-project", 16)

        def batch() -> list[RolloutCall]:
            return [
                RolloutCall(
                    adapter.adapter_id,
                    {"skill": "detect", "object": "shape", "image_url": image},
                    ROLLOUTS,
                )
                for image in images
            ]

        pending = asyncio.ensure_future(client.rollouts_many(batch(), max_concurrency=BATCH))
        ends = []
        for _ in range(steps):
            answers = await pending
            pending = asyncio.ensure_future(client.rollouts_many(batch(), max_concurrency=BATCH))
            await client.train_step(adapter.adapter_id, [a.to_group(REWARDS) for a in answers])
            ends.append(time.perf_counter())
        await pending
    return _intervals(ends)


def sdk_loop(base_url: str, images: list[str], steps: int, **stream: int) -> float:
    """Median step seconds of the SDK's own loop: ``rollout_stream`` and ``train_step``."""
    ft = moondream.ft(KEY, name="bench-sdk", rank=16, endpoint=base_url)

    def requests() -> Iterator[tuple[int, dict[str, Any]]]:
        for index in range(steps * BATCH):
            image = Base64EncodedImage(image_url=images[index % BATCH])
            yield (
                index,
                {"skill": "detect", "image": image, "object": "shape", "num_rollouts": ROLLOUTS},
            )

    ends, groups = [], []
    for _, answer in ft.rollout_stream(requests(), **stream):
        groups.append(
            {
                "mode": "rl",
                "request": answer["request"],
                "rollouts": answer["rollouts"],
                "rewards": REWARDS,
            }
        )
        if len(groups) == BATCH:
            ft.train_step(groups, lr=1e-3)
            ends.append(time.perf_counter())
            groups = []
    return _intervals(ends)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    images = _images()
    with (
        tempfile.TemporaryDirectory() as folder,
        serve_http(folder, "--policy", "constant", *LATENCY) as url,
    ):
        project = asyncio.run(project_loop(url, images, args.steps))
        sdk_default = sdk_loop(url, images, args.steps)
        sdk_equal = sdk_loop(url, images, args.steps, max_concurrency=BATCH)
    rows = [
        ["project (rollouts_many + train_step)", project, 1.0],
        ["SDK rollout_stream, defaults", sdk_default, sdk_default / project],
        [f"SDK rollout_stream, max_concurrency={BATCH}", sdk_equal, sdk_equal / project],
    ]
    print_table(["loop", "step_s", "project_speedup"], rows)
    path = write_results(
        "vs_sdk",
        {
            "batch": BATCH,
            "rollouts": ROLLOUTS,
            "latency_s": {"rollouts": 0.2, "train_step": 0.5},
            "steps": args.steps,
            "step_s": {
                "project": project,
                "sdk_default": sdk_default,
                "sdk_equal_concurrency": sdk_equal,
            },
            "speedup": {
                "vs_sdk_default": sdk_default / project,
                "vs_sdk_equal_concurrency": sdk_equal / project,
            },
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
