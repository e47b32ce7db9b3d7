"""Training loop efficiency: ``MoondreamRLModule`` in a ``Trainer`` against the ideal step time.

The local service runs in this process with the no-compute ``constant`` policy and
injected latency (rollouts 200 ms, train step 500 ms: the least time each answer takes,
the service's own handling included, as a remote service's would be), so the step time
is what the loop makes of the latency. The ideal step is rollouts + train step at ``max_staleness=0``
(every rollout of a batch in flight at once, then the step) and the larger of the two at
``max_staleness=1`` (the next batch is sampled while the step is applied). The baseline
is a plain loop with ``TuningClient`` sending one request at a time (in-process).

Each configuration runs twice: against the local service in this process (the module's
default backend, whose request handling then shares this process's event loop and GIL)
and against ``lightning-moondream serve`` in a child process over HTTP on 127.0.0.1, so
the second measures the client-side loop alone.

Images are encoded before the run, so encoding is not measured. Step times are the
median interval between consecutive batch ends, after a warm-up step.

Run: ``python benchmarks/bench_training_loop.py [--quick]``
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
from common import (
    alternating_reward,
    encoded_samples,
    plain_train_step,
    print_table,
    quiet_trainer,
    serve_http,
    write_results,
)
from pydantic import SecretStr
from torch.utils.data import DataLoader

from lightning_moondream.api import TuningClient
from lightning_moondream.data import SampleList, collate_samples
from lightning_moondream.module import MoondreamRLModule

ROLLOUTS_LATENCY = 0.2
TRAIN_STEP_LATENCY = 0.5
SERVICE = {
    "policy": "constant",
    "latency": {"rollouts": ROLLOUTS_LATENCY, "train_step": TRAIN_STEP_LATENCY},
}
HEADERS = [
    "batch",
    "rollouts",
    "staleness",
    "ideal_s",
    "in-proc_s",
    "of_ideal",
    "HTTP_s",
    "of_ideal",
    "plain_s",
    "speedup",
]


class StepTimer(pl.Callback):
    """Time of each batch end, for the intervals between steps."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(time.perf_counter())


def module_step_time(
    data: list[Any], batch: int, num_rollouts: int, staleness: int, steps: int, base_url: str | None
) -> float:
    """Median seconds per step of the Lightning loop, warm-up step excluded.

    With ``base_url`` the module talks HTTP to that service; without it, it runs the
    local service in this process (its default backend).
    """
    with tempfile.TemporaryDirectory() as folder:
        backend: dict[str, Any] = (
            {"base_url": base_url, "api_key": SecretStr("bench")}
            if base_url
            else {"local_service": {"data_dir": folder, **SERVICE}}
        )
        module = MoondreamRLModule(
            num_rollouts=num_rollouts,
            max_staleness=staleness,
            max_concurrency=batch,
            reward=alternating_reward,
            **backend,
        )
        timer = StepTimer()
        trainer = quiet_trainer(folder, steps + 1, timer)
        loader: DataLoader[Any] = DataLoader(
            SampleList(data), batch_size=batch, shuffle=False, collate_fn=collate_samples
        )
        trainer.fit(module, loader)
    intervals = [later - earlier for earlier, later in itertools.pairwise(timer.ends)]
    return statistics.median(intervals)


def plain_step_time(data: list[Any], batch: int, num_rollouts: int, steps: int) -> float:
    """Median seconds per step of a loop sending one request at a time."""
    times = []
    with (
        tempfile.TemporaryDirectory() as folder,
        TuningClient.local(data_dir=folder, **SERVICE) as client,
    ):
        adapter = client.adapters.create("plain-loop", rank=16)
        for step in range(steps):
            started = time.perf_counter()
            samples = data[step * batch : (step + 1) * batch]
            plain_train_step(client, adapter.adapter_id, samples, num_rollouts)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps per configuration")
    args = parser.parse_args()
    steps = 3 if args.quick else 6
    batches, rollouts, stalenesses = (8, 32), (4, 16), (0, 1)
    data = encoded_samples(max(batches) * (steps + 1))
    rows, results = [], []
    latency = [f"rollouts={ROLLOUTS_LATENCY}", f"train_step={TRAIN_STEP_LATENCY}"]
    options = ["--policy", "constant", "--latency", latency[0], "--latency", latency[1]]
    with tempfile.TemporaryDirectory() as folder, serve_http(folder, *options) as base_url:
        for batch, num_rollouts in itertools.product(batches, rollouts):
            plain = plain_step_time(data, batch, num_rollouts, 1 if args.quick else 2)
            for staleness in stalenesses:
                ideal = (
                    ROLLOUTS_LATENCY + TRAIN_STEP_LATENCY
                    if staleness == 0
                    else max(ROLLOUTS_LATENCY, TRAIN_STEP_LATENCY)
                )
                local = module_step_time(data, batch, num_rollouts, staleness, steps, None)
                http = module_step_time(data, batch, num_rollouts, staleness, steps, base_url)
                speedup = plain / local
                result = {
                    "batch": batch,
                    "num_rollouts": num_rollouts,
                    "max_staleness": staleness,
                    "ideal_s": ideal,
                    "in_process_step_s": local,
                    "in_process_of_ideal": ideal / local,
                    "http_step_s": http,
                    "http_of_ideal": ideal / http,
                    "plain_loop_step_s": plain,
                    "speedup_vs_plain": speedup,
                }
                results.append(result)
                rows.append([batch, num_rollouts, staleness, ideal, local, ideal / local])
                rows[-1].extend([http, ideal / http, plain, speedup])
    print_table(
        HEADERS,
        rows,
    )
    path = write_results(
        "training_loop",
        {
            "latency_s": {"rollouts": ROLLOUTS_LATENCY, "train_step": TRAIN_STEP_LATENCY},
            "steps_per_configuration": steps,
            "results": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
