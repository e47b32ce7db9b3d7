"""Helpers shared by the benchmarks: the machine they ran on, a table, the results file,
the service under test, samples, a quiet trainer, and the plain-loop baseline's train step."""

from __future__ import annotations

import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).parent / "results"
_FLIP = itertools.count()


def machine() -> dict[str, Any]:
    """Architecture, CPU count and CPU model, to read figures from other machines with care."""
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"machine": platform.machine(), "nproc": os.cpu_count(), "cpu": model}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows under headers, columns right-aligned; floats with 3 decimals."""
    cells = [
        [f"{value:.3f}" if isinstance(value, float) else str(value) for value in row]
        for row in rows
    ]
    widths = [
        max(len(str(header)), *(len(row[i]) for row in cells)) for i, header in enumerate(headers)
    ]
    print("  ".join(f"{header:>{width}}" for header, width in zip(headers, widths, strict=True)))
    for row in cells:
        print("  ".join(f"{cell:>{width}}" for cell, width in zip(row, widths, strict=True)))


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the machine's description added."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


@contextmanager
def serve_http(
    folder: str, *options: str, on_line: Callable[[str], None] | None = None
) -> Iterator[str]:
    """Run ``lightning-moondream serve`` on a free port of 127.0.0.1; yields its base URL.

    Args:
        folder: The service's data folder.
        *options: More ``serve`` options, e.g. ``"--policy", "constant"``.
        on_line: Given each line the service prints (its access log among them), as it
            is printed; by default its output is dropped.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    command = [str(Path(sys.executable).with_name("lightning-moondream")), "serve"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--data-dir", folder, *options]
    output = subprocess.DEVNULL if on_line is None else subprocess.PIPE
    server = subprocess.Popen(
        command,
        stdout=output,
        stderr=subprocess.STDOUT if on_line else subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if on_line is not None:
        lines = server.stdout
        threading.Thread(
            target=lambda: [on_line(line) for line in lines or ()], daemon=True
        ).start()
    base_url = f"http://127.0.0.1:{port}/v1/tuning"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"lightning-moondream serve exited with {server.returncode}")
            try:
                httpx.get(base_url + "/adapters", headers={"X-Moondream-Auth": "bench"}, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield base_url
    finally:
        server.terminate()
        server.wait(timeout=30)


def encoded_samples(count: int, max_side: int = 128) -> list[Any]:
    """``count`` synthetic detect samples, their images encoded in advance (not measured)."""
    from lightning_moondream.data import SyntheticShapes
    from lightning_moondream.images import EncodingOptions

    dataset = SyntheticShapes("train", num_images=count, skills=("detect",), tasks_per_image=1)
    options = EncodingOptions(max_side=max_side)
    return [dataset[index].encoded(options) for index in range(len(dataset))]


def quiet_trainer(folder: str, max_steps: int, callback: Any, **options: Any) -> Any:
    """A CPU ``Trainer`` that only trains: no logger, checkpoints, bars or validation.

    Lightning's advice to give the loader workers is silenced too: the samples are
    encoded in advance, so workers would only add processes.

    Args:
        folder: The trainer's root folder.
        max_steps: Global steps to run.
        callback: The one callback, e.g. a timer.
        **options: More ``Trainer`` arguments, e.g. ``devices=2, strategy="ddp"``.
    """
    import lightning.pytorch as pl

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[callback],
        default_root_dir=folder,
        **options,
    )


def alternating_reward(sample: Any, rollout: Any) -> float:
    """0, 1, 0, 1, ...: the constant policy answers alike, and equal rewards teach nothing."""
    return float(next(_FLIP) % 2)


def plain_train_step(
    client: Any, adapter_id: str, samples: Sequence[Any], num_rollouts: int
) -> None:
    """One train step of the plain-loop baseline: one request at a time, then the step.

    Each sample's rollouts (temperature 1) are requested in turn and rewarded with
    :func:`alternating_reward`; then the groups are sent as one train step.
    """
    from lightning_moondream.api import Settings

    settings = Settings(temperature=1.0)
    groups = []
    for sample in samples:
        response = client.rollouts(adapter_id, sample.to_request(settings), num_rollouts)
        rewards = [alternating_reward(sample, rollout) for rollout in response.rollouts]
        groups.append(response.to_group(rewards))
    client.train_step(adapter_id, groups)
