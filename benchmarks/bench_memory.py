"""Memory: resident set size over 500 train steps stays flat (growth under 50 MB).

``MoondreamRLModule`` in a ``Trainer`` runs 500 steps against the in-process local service
with the no-compute ``constant`` policy and no added latency, so the steps come fast and
anything kept per step shows. RSS is read from ``/proc/self/statm`` every 50 steps; the
start is taken after 20 warm-up steps (imports, first allocations, caches filling). The
baseline is a plain ``TuningClient`` loop doing the same requests, in the same process.

Run: ``python benchmarks/bench_memory.py [--quick]`` (``--quick``: 200 steps)
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
from typing import Any

import lightning.pytorch as pl
from common import (
    alternating_reward,
    encoded_samples,
    plain_train_step,
    print_table,
    quiet_trainer,
    write_results,
)
from torch.utils.data import DataLoader

from lightning_moondream.api import TuningClient
from lightning_moondream.data import SampleList, collate_samples
from lightning_moondream.module import MoondreamRLModule

BATCH, NUM_ROLLOUTS, WARMUP, EVERY, LIMIT_MB = 8, 4, 20, 50, 50.0
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """Resident set size of this process in MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / 2**20


class RssProbe(pl.Callback):
    """RSS after the warm-up and every ``EVERY`` steps."""

    def __init__(self) -> None:
        self.readings: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step == WARMUP or (step > WARMUP and step % EVERY == 0):
            gc.collect()
            self.readings.append((step, rss_mb()))


def module_run(data: list[Any], steps: int) -> list[tuple[int, float]]:
    with tempfile.TemporaryDirectory() as folder:
        module = MoondreamRLModule(
            num_rollouts=NUM_ROLLOUTS,
            max_concurrency=BATCH,
            reward=alternating_reward,
            local_service={"data_dir": folder, "policy": "constant"},
        )
        probe = RssProbe()
        trainer = quiet_trainer(folder, steps, probe)
        # Epochs repeat the same samples, as a real run over a dataset does.
        loader: DataLoader[Any] = DataLoader(
            SampleList(data), batch_size=BATCH, shuffle=True, collate_fn=collate_samples
        )
        trainer.fit(module, loader)
    return probe.readings


def plain_run(data: list[Any], steps: int) -> list[tuple[int, float]]:
    readings = []
    with (
        tempfile.TemporaryDirectory() as folder,
        TuningClient.local(data_dir=folder, policy="constant") as client,
    ):
        adapter = client.adapters.create("memory", rank=16)
        for step in range(1, steps + 1):
            batch = [data[(step * BATCH + i) % len(data)] for i in range(BATCH)]
            plain_train_step(client, adapter.adapter_id, batch, NUM_ROLLOUTS)
            if step == WARMUP or (step > WARMUP and step % EVERY == 0):
                gc.collect()
                readings.append((step, rss_mb()))
    return readings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 steps instead of 500")
    args = parser.parse_args()
    steps = 200 if args.quick else 500
    data = encoded_samples(64)
    results: dict[str, dict[str, Any]] = {}
    for name, run in (
        ("plain TuningClient loop (baseline)", plain_run),
        ("MoondreamRLModule + Trainer", module_run),
    ):
        readings = run(data, steps)
        start, end = readings[0][1], readings[-1][1]
        results[name] = {
            "readings": readings,
            "start_mb": start,
            "end_mb": end,
            "growth_mb": end - start,
        }
    rows = [[name, r["start_mb"], r["end_mb"], r["growth_mb"]] for name, r in results.items()]
    print(f"{steps} train steps, batch {BATCH}, {NUM_ROLLOUTS} rollouts; RSS from step {WARMUP}")
    print_table(["run", "start MB", "end MB", "growth MB"], rows)
    growth = results["MoondreamRLModule + Trainer"]["growth_mb"]
    verdict = "PASS" if growth < LIMIT_MB else "FAIL"
    print(f"module growth {growth:.1f} MB (limit {LIMIT_MB:.0f} MB): {verdict}")
    path = write_results(
        "memory",
        {
            "steps": steps,
            "batch": BATCH,
            "num_rollouts": NUM_ROLLOUTS,
            "limit_mb": LIMIT_MB,
            "results": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
