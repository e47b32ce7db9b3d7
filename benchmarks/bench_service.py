"""The local tuning service: rollouts per second and train-step latency, HTTP vs in-process.

The reference (learning) policy serves detect requests on synthetic 128 px images. Over
HTTP, ``lightning-moondream serve`` runs under uvicorn in a child process on 127.0.0.1
(one torch thread per request, its default); in-process, the app runs in this process
behind ``TuningClient.local``, as the module's default backend does. The in-process
figures are the baseline the HTTP ones are compared with.

Measured per mode: rollouts per second with ``num_rollouts`` 8 and 1 (greedy, as in
evaluation), ``max_concurrency`` 4; and the latency of a train step of 8 groups of 8
rollouts.

Run: ``python benchmarks/bench_service.py [--quick]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from common import print_table, serve_http, write_results

from lightning_moondream.api import RolloutCall, Settings, TuningClient
from lightning_moondream.data import SyntheticShapes
from lightning_moondream.images import EncodingOptions

CONCURRENCY = 4
GROUPS, GROUP_ROLLOUTS = 8, 8


@contextmanager
def http_service(folder: str) -> Iterator[TuningClient]:
    """A client of ``lightning-moondream serve`` started in a child process."""
    with serve_http(folder) as base_url, TuningClient(api_key="bench", base_url=base_url) as client:
        yield client


@contextmanager
def in_process_service(folder: str) -> Iterator[TuningClient]:
    with TuningClient.local(data_dir=folder) as client:
        yield client


def measure(
    client: TuningClient, data: list[Any], requests: int, train_steps: int
) -> dict[str, float]:
    adapter = client.adapters.create("service-bench", rank=16).adapter_id
    figures: dict[str, float] = {}
    for num_rollouts, temperature in ((8, 1.0), (1, 0.0)):
        settings = Settings(temperature=temperature)
        calls = [
            RolloutCall(adapter, sample.to_request(settings), num_rollouts, sample.ground_truth())
            for sample in data[:requests]
        ]
        client.rollouts_many(calls[:CONCURRENCY], max_concurrency=CONCURRENCY)  # warm-up
        started = time.perf_counter()
        client.rollouts_many(calls, max_concurrency=CONCURRENCY)
        elapsed = time.perf_counter() - started
        figures[f"rollouts_per_s_n{num_rollouts}"] = requests * num_rollouts / elapsed
        figures[f"requests_per_s_n{num_rollouts}"] = requests / elapsed
    settings = Settings(temperature=1.0)
    calls = [
        RolloutCall(adapter, sample.to_request(settings), GROUP_ROLLOUTS, sample.ground_truth())
        for sample in data[:GROUPS]
    ]
    groups = [
        response.to_group(response.rewards)
        for response in client.rollouts_many(calls, max_concurrency=CONCURRENCY)
    ]
    latencies = []
    for _ in range(train_steps):
        started = time.perf_counter()
        client.train_step(adapter, groups)
        latencies.append(time.perf_counter() - started)
    figures["train_step_s_median"] = statistics.median(latencies)
    figures["train_step_s_max"] = max(latencies)
    client.adapters.delete(adapter)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and steps")
    args = parser.parse_args()
    requests, train_steps = (16, 3) if args.quick else (48, 6)
    dataset = SyntheticShapes("val", num_images=requests, skills=("detect",), tasks_per_image=1)
    data = [dataset[i].encoded(EncodingOptions(max_side=128)) for i in range(len(dataset))]
    results = {}
    for mode, service in (
        ("in-process (baseline)", in_process_service),
        ("HTTP 127.0.0.1", http_service),
    ):
        with tempfile.TemporaryDirectory() as folder, service(folder) as client:
            results[mode] = measure(client, data, requests, train_steps)
    keys = list(next(iter(results.values())))
    print(
        f"reference policy, {requests} detect requests, concurrency {CONCURRENCY}; train step of {GROUPS}x{GROUP_ROLLOUTS}"
    )
    print_table(
        ["mode", *keys],
        [[mode, *(figures[key] for key in keys)] for mode, figures in results.items()],
    )
    path = write_results(
        "service",
        {
            "requests": requests,
            "train_steps": train_steps,
            "concurrency": CONCURRENCY,
            "results": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
