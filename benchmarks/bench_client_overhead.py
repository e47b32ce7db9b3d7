"""Client overhead: CPU time per ``/rollouts`` request, against a bare httpx request.

Every request goes through an ``httpx.MockTransport`` answering a canned response of 8
detect rollouts, so only client-side work is measured: building and validating the
request, JSON, retries bookkeeping, usage counters, parsing the response into typed
models. Images are encoded before timing (a data URL of a photo-like JPEG, 768 px on the long side), so
image encoding is not part of it. The baseline posts the same JSON body with a bare
``httpx.Client`` (``json=``) and decodes the response with ``response.json()``.

Run: ``python benchmarks/bench_client_overhead.py [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
from common import print_table, write_results
from PIL import Image

from lightning_moondream.api import (
    AsyncTuningClient,
    DetectGroundTruth,
    DetectRequest,
    RolloutCall,
    Settings,
    TuningClient,
)
from lightning_moondream.data import DetectSample
from lightning_moondream.data.encoding import DEFAULT_MAX_SIDE
from lightning_moondream.images import EncodingOptions

BASE_URL = "http://bench.invalid/v1/tuning"
NUM_ROLLOUTS = 8


def photo_data_url() -> DetectSample:
    """A detect sample whose image is already a data URL of a photo-like 1024x768 picture."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:768, 0:1024].astype(np.float32)
    channels = [
        128
        + 80 * np.sin(x / 1024 * f * 6.28) * np.cos(y / 768 * f * 6.28)
        + rng.normal(0, 10, x.shape)
        for f in (1.5, 3.0, 4.5)
    ]
    array = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    sample = DetectSample.from_pixels(
        buffer.getvalue(), "raccoon", [(100, 120, 500, 600), (600, 80, 900, 400)]
    )
    return sample.encoded(EncodingOptions(max_side=DEFAULT_MAX_SIDE))


def canned_response(request_json: dict[str, Any]) -> bytes:
    """The service's answer shape: echoed request, rollouts with opaque fields, rewards."""
    rollout = {
        "skill": "detect",
        "output": {
            "boxes": [{"x_min": 0.1, "y_min": 0.15, "x_max": 0.49, "y_max": 0.78}] * 2,
        },
        "answer_tokens": list(range(12)),
        "coords": [[0.1, 0.15, 0.49, 0.78]] * 2,
        "meta": {"signature": "x" * 64, "logprobs": [-0.1] * 12},
    }
    body = {
        "request": request_json,
        "rollouts": [rollout] * NUM_ROLLOUTS,
        "rewards": [0.5] * NUM_ROLLOUTS,
    }
    return json.dumps(body).encode()


def cpu_per_call(function: Callable[[], Any], repeats: int) -> float:
    """Median over 5 rounds of CPU seconds per call (the process's CPU, all threads)."""
    function()
    rounds = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(repeats):
            function()
        rounds.append((time.process_time() - started) / repeats)
    return float(np.median(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    args = parser.parse_args()
    repeats = 50 if args.quick else 200

    sample = photo_data_url()
    settings = Settings(temperature=1.0)
    request = sample.to_request(settings)
    assert isinstance(request, DetectRequest)
    truth = sample.ground_truth()
    assert isinstance(truth, DetectGroundTruth)
    request_json = request.model_dump(mode="json", exclude_none=True)
    body = {
        "adapter_id": "bench",
        "num_rollouts": NUM_ROLLOUTS,
        "request": request_json,
        "ground_truth": truth.model_dump(mode="json"),
    }
    answer = canned_response(request_json)

    def handler(incoming: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=answer, headers={"content-type": "application/json"})

    transport = httpx.MockTransport(handler)
    bare = httpx.Client(transport=transport)
    client = TuningClient(
        api_key="bench", base_url=BASE_URL, http_client=httpx.Client(transport=transport)
    )
    async_client = AsyncTuningClient(
        api_key="bench", base_url=BASE_URL, http_client=httpx.AsyncClient(transport=transport)
    )
    content = json.dumps(body, separators=(",", ":")).encode()

    def baseline() -> None:
        # Serializing the body is part of any request, so the baseline does it each time too.
        bare.post(BASE_URL + "/rollouts", json=body, headers={"X-Moondream-Auth": "bench"}).json()

    def typed() -> None:
        client.rollouts("bench", request, NUM_ROLLOUTS, truth)

    def from_sample() -> None:
        client.rollouts("bench", sample.to_request(settings), NUM_ROLLOUTS, sample.ground_truth())

    calls = [RolloutCall("bench", request, NUM_ROLLOUTS, truth)] * 32
    loop = asyncio.new_event_loop()

    def batched() -> None:
        loop.run_until_complete(async_client.rollouts_many(calls, max_concurrency=32))

    cases = [
        ("bare httpx post + json (baseline)", baseline, 1),
        ("TuningClient.rollouts, typed request", typed, 1),
        ("TuningClient.rollouts from a sample", from_sample, 1),
        ("AsyncTuningClient.rollouts_many x32", batched, 32),
    ]
    results = []
    base_cpu = 0.0
    for name, function, per_call in cases:
        seconds = cpu_per_call(function, max(1, repeats // per_call)) / per_call
        base_cpu = base_cpu or seconds
        results.append(
            {"case": name, "cpu_us_per_request": seconds * 1e6, "vs_baseline": seconds / base_cpu}
        )
    loop.close()
    print(
        f"request body {len(content)} bytes, response {len(answer)} bytes, {NUM_ROLLOUTS} rollouts"
    )
    print_table(
        ["case", "CPU us/request", "x baseline"],
        [[r["case"], r["cpu_us_per_request"], r["vs_baseline"]] for r in results],
    )
    path = write_results(
        "client_overhead",
        {
            "num_rollouts": NUM_ROLLOUTS,
            "request_bytes": len(content),
            "response_bytes": len(answer),
            "results": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
