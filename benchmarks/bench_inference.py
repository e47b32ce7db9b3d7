"""Scoring a checkpoint on 256 detect prompts: inference API, greedy rollouts, official SDK.

``lightning-moondream serve`` runs in a child process over HTTP on 127.0.0.1 with the
no-compute ``constant`` policy and 50 ms of injected latency on the inference API and on
``/rollouts``, so the figures measure clients and wire, not the model. A finetune is
created and its checkpoint saved; every path then scores the same 256 synthetic detect
prompts (greedy, temperature 0) against their true boxes:

- ours: ``InferenceClient.many`` on ``/v1/detect`` with model ``moondream3-preview/FT@STEP``;
- rollouts: ``TuningClient.rollouts_many``, one greedy rollout per prompt;
- SDK: ``moondream.vl(...).detect`` with the same model, one at a time or in threads.

Each runs with 1 and with 8 requests in flight. The latency bound is what the injected
latency allows, concurrency / latency requests per second; each path's throughput is
given with its ratio to that bound, and to the SDK's at equal concurrency. The mean
reward of every path is reported too: the same answers give the same score.

Client and service share the machine's cores, so other work on it lowers every figure.
With ``--repeats N`` every path runs N times, the paths taking turns so that a busy
spell falls on all of them alike; each figure is then the median of its N runs. The
load average before and after is printed and kept with the results.

Run: ``python benchmarks/bench_inference.py [--prompts 256] [--repeats 1]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import moondream
from common import print_table, serve_http, write_results
from moondream.types import Base64EncodedImage

from lightning_moondream.api import DetectRequest, RolloutCall, TuningClient
from lightning_moondream.api.inference import AsyncInferenceClient, InferenceClient
from lightning_moondream.api.inference_models import DetectCall, model_id
from lightning_moondream.data import synthetic
from lightning_moondream.images import encode_image
from lightning_moondream.rewards import ground_truth_reward

KEY = "bench-inference"
LATENCY_S = 0.05
CONCURRENCIES = (1, 8)
GREEDY = {"temperature": 0.0}
Prompt = tuple[str, str, list[dict[str, float]]]
"""An image data URL, an object phrase and the true boxes."""


def _prompts(count: int) -> list[Prompt]:
    """``count`` synthetic detect prompts, images encoded in advance (not measured)."""
    prompts = []
    for index in range(count):
        scene = synthetic.make_scene(synthetic.split_seed("test", index))
        phrase, boxes = synthetic.detect_tasks(scene)[0]
        truth = [dict(zip(("x_min", "y_min", "x_max", "y_max"), b, strict=True)) for b in boxes]
        prompts.append((encode_image(scene.image), phrase, truth))
    return prompts


def _score(prompts: list[Prompt], answers: list[list[dict[str, float]]]) -> float:
    """Mean detect reward of the answers against the true boxes."""
    return statistics.fmean(
        ground_truth_reward("detect", {"boxes": boxes}, {"boxes": truth})
        for (_, _, truth), boxes in zip(prompts, answers, strict=True)
    )


def _timed(run: Callable[[], list[list[dict[str, float]]]]) -> tuple[float, list[Any]]:
    """Seconds a run takes, and its answers."""
    started = time.perf_counter()
    answers = run()
    return time.perf_counter() - started, answers


def ours(url: str, model: str, prompts: list[Prompt], concurrency: int) -> Any:
    """Boxes of every prompt through our inference client."""
    with InferenceClient(api_key=KEY, tuning_url=url, model=model) as client:
        calls = [DetectCall(image, phrase, GREEDY) for image, phrase, _ in prompts]
        client.many(calls[:concurrency], max_concurrency=concurrency)  # warm the connections

        def run() -> list[list[dict[str, float]]]:
            results = client.many(calls, max_concurrency=concurrency)
            return [[box.model_dump() for box in result.objects] for result in results]

        return _timed(run)


def ours_async(url: str, model: str, prompts: list[Prompt], concurrency: int) -> Any:
    """Boxes of every prompt through our async inference client, on one event loop."""

    async def measure() -> Any:
        async with AsyncInferenceClient(api_key=KEY, tuning_url=url, model=model) as client:
            calls = [DetectCall(image, phrase, GREEDY) for image, phrase, _ in prompts]
            await client.many(calls[:concurrency], max_concurrency=concurrency)
            started = time.perf_counter()
            results = await client.many(calls, max_concurrency=concurrency)
            seconds = time.perf_counter() - started
            return seconds, [[box.model_dump() for box in result.objects] for result in results]

    return asyncio.run(measure())


def rollouts(url: str, finetune_id: str, prompts: list[Prompt], concurrency: int) -> Any:
    """Boxes of every prompt through one greedy rollout each."""
    with TuningClient(api_key=KEY, base_url=url) as client:
        calls = [
            RolloutCall(
                finetune_id, DetectRequest(image_url=image, object=phrase, settings=GREEDY), 1
            )
            for image, phrase, _ in prompts
        ]
        client.rollouts_many(calls[:concurrency], max_concurrency=concurrency)

        def run() -> list[list[dict[str, float]]]:
            answers = client.rollouts_many(calls, max_concurrency=concurrency)
            return [answer.rollouts[0].output["boxes"] for answer in answers]

        return _timed(run)


def sdk(url: str, model: str, prompts: list[Prompt], concurrency: int) -> Any:
    """Boxes of every prompt through the official SDK's ``md.vl``, in ``concurrency`` threads."""
    vl = moondream.vl(endpoint=url.removesuffix("/tuning"), api_key=KEY, model=model)

    def detect(prompt: Prompt) -> list[dict[str, float]]:
        image, phrase, _ = prompt
        return vl.detect(Base64EncodedImage(image_url=image), phrase, settings=GREEDY)["objects"]

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(detect, prompts[:concurrency]))
        return _timed(lambda: list(pool.map(detect, prompts)))


def _load() -> str:
    """The load averages over 1, 5 and 15 minutes."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="runs of every path (median)")
    args = parser.parse_args()
    prompts = _prompts(args.prompts)
    latency = ("--latency", f"inference={LATENCY_S}", "--latency", f"rollouts={LATENCY_S}")
    load_before = _load()
    runs: dict[str, dict[int, list[float]]] = {}
    rewards: dict[str, dict[int, float]] = {}
    with (
        tempfile.TemporaryDirectory() as folder,
        serve_http(folder, "--policy", "constant", *latency) as url,
    ):
        with TuningClient(api_key=KEY, base_url=url, dialect="finetunes") as tuning:
            finetune = tuning.adapters.create("bench-inference", 16)
            step = tuning.checkpoints.save(finetune.adapter_id).step or 0
        model = model_id(finetune.adapter_id, step)
        paths = {
            "ours (InferenceClient.many)": lambda c: ours(url, model, prompts, c),
            "ours (AsyncInferenceClient.many)": lambda c: ours_async(url, model, prompts, c),
            "rollouts (TuningClient.rollouts_many)": lambda c: rollouts(
                url, finetune.adapter_id, prompts, c
            ),
            "SDK md.vl (threads)": lambda c: sdk(url, model, prompts, c),
        }
        for _ in range(args.repeats):
            for name, path in paths.items():
                for concurrency in CONCURRENCIES:
                    seconds, answers = path(concurrency)
                    runs.setdefault(name, {}).setdefault(concurrency, []).append(
                        len(prompts) / seconds
                    )
                    rewards.setdefault(name, {})[concurrency] = _score(prompts, answers)
    load_after = _load()
    figures: dict[str, dict[int, dict[str, Any]]] = {
        name: {
            concurrency: {
                "requests_per_s": statistics.median(rates),
                "of_latency_bound": statistics.median(rates) / (concurrency / LATENCY_S),
                "mean_reward": rewards[name][concurrency],
                "runs_requests_per_s": rates,
            }
            for concurrency, rates in by_concurrency.items()
        }
        for name, by_concurrency in runs.items()
    }
    sdk_figures = figures["SDK md.vl (threads)"]
    rows = [
        [
            name,
            concurrency,
            item["requests_per_s"],
            item["of_latency_bound"],
            item["requests_per_s"] / sdk_figures[concurrency]["requests_per_s"],
            item["mean_reward"],
        ]
        for name, by_concurrency in figures.items()
        for concurrency, item in by_concurrency.items()
    ]
    print(f"load average before: {load_before}; after: {load_after}; runs per path: {args.repeats}")
    print_table(["path", "concurrency", "req_per_s", "of_bound", "vs_sdk", "reward"], rows)
    written = write_results(
        "inference",
        {
            "prompts": len(prompts),
            "latency_s": LATENCY_S,
            "policy": "constant",
            "repeats": args.repeats,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "figures": {name: {str(c): v for c, v in f.items()} for name, f in figures.items()},
        },
    )
    print(f"results: {written}")


if __name__ == "__main__":
    main()
