"""Requests at a service's rate limit: the project against the SDK, and the quickstart.

``lightning-moondream serve --rate-limit R`` runs in a child process on 127.0.0.1 (one
API key; token bucket of ``R`` per second, bursts of ``max(1, ceil(R / 5))``, ``429``
with ``Retry-After`` over it). Its access log is read as it is written: each line is
one answer, timed on arrival. Each configuration gets a fresh service.

1. Rollouts at R = 2 and 10 requests/s, from 1 and 2 processes started together, the
   same requests for every client (60 at R = 2, 120 at R = 10: half a minute and 12
   seconds at the limit; a 429 is then under 2 per 100 requests, where the 21 requests
   of a shorter run would count it as 5):
   - project: each process's connection takes its share of the key's rate
     (``requests_per_second=R``), as ``MoondreamRLModule`` grants it to every
     process of a run, and sends batches of 8 ``rollouts_many`` calls, as many in
     flight as the admitted rate and latency call for;
   - project, rate learnt: the same without ``requests_per_second``: each process
     takes its share of Moondream Cloud's funded tier (10/s) and, refused, of its
     default one (2/s): one 429 per process at R = 2, its pause included;
   - SDK: ``Finetune.rollout_stream`` over the same requests, at its defaults.
2. The quickstart (``configs/quickstart.yaml``: 6 steps at R = 10; 2 steps and 8
   validation images at R = 2) under DDP with 2 processes, with
   ``--model.requests_per_second R`` and without it, counting every request (the
   held-out evaluations before and after training too).

Figures per configuration: achieved rate over R (answers admitted, less one, over
the time from the first to the last; goal >= 0.95, 0.9 for the quickstart), 429s per
100 requests (goal <= 2) and failed calls or train steps not applied (goal 0).

Run: ``python benchmarks/bench_rate_limit.py [--skip-quickstart]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import print_table, serve_http, write_results

KEY = "bench-rate-limit"
ROLLOUTS = 4
BATCH = 8
REQUESTS = {2.0: 60, 10.0: 120}
"""Rollouts requests per configuration (all processes together), by rate."""
CLIENTS = ("project", "project, rate learnt", "sdk")
QUICKSTART = {10.0: (6, 64), 2.0: (2, 8)}
"""Steps and validation images (evaluated before and after training) by rate."""
ROOT = Path(__file__).parent.parent
ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')
EXECUTABLES = Path(sys.executable).parent


@dataclass
class AccessLog:
    """The answers of a ``serve`` process, timed as its access log lines arrive."""

    answers: list[tuple[float, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, line: str) -> None:
        """Time one line of the log, if it tells an answer."""
        match = ACCESS.search(line)
        if match:
            with self.lock:
                self.answers.append((time.monotonic(), match["path"], int(match["status"])))

    def figures(self, rate: float, path_part: str = "") -> dict[str, float]:
        """Achieved rate over ``rate`` and 429s per 100 requests, of paths holding ``path_part``."""
        with self.lock:
            answers = [answer for answer in self.answers if path_part in answer[1]]
        admitted = [moment for moment, _, status in answers if status != 429]
        refused = sum(status == 429 for _, _, status in answers)
        span = max(admitted) - min(admitted) if len(admitted) > 1 else float("nan")
        return {
            "requests": len(answers),
            "admitted": len(admitted),
            "rate_limited": refused,
            "seconds": span,
            "achieved_rps": (len(admitted) - 1) / span,
            "fraction_of_limit": (len(admitted) - 1) / span / rate,
            "429_per_100": 100.0 * refused / len(answers),
        }


@contextmanager
def rate_limited_serve(folder: str, rate: float) -> Iterator[tuple[str, AccessLog]]:
    """``serve --rate-limit rate`` on a free port; yields its base URL and access log."""
    log = AccessLog()
    options = ("--api-key", KEY, "--rate-limit", f"{rate:g}")
    with serve_http(folder, *options, on_line=log.take) as base_url:
        with log.lock:
            log.answers.clear()  # the readiness probe is not the run's
        yield base_url, log


def _request(index: int) -> dict[str, Any]:
    from lightning_moondream.data import synthetic
    from lightning_moondream.images import encode_image

    scene = synthetic.make_scene(synthetic.split_seed("train", index % 4))
    return {"skill": "detect", "object": "shape", "image_url": encode_image(scene.image)}


def project_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One process of the project: its share of the key's rate (or none), batches of ``BATCH``."""
    from pydantic import SecretStr

    from lightning_moondream.api import TuningAPIError, UsageStats
    from lightning_moondream.api.client import RolloutCall
    from lightning_moondream.distributed import Collective
    from lightning_moondream.session.connection import Connection
    from lightning_moondream.session.sampling import concurrency
    from lightning_moondream.session.service import ServiceChoice

    choice = ServiceChoice(api_key=SecretStr(KEY), base_url=args.base_url, dialect="finetunes")
    connection = Connection(choice, UsageStats(), print, None if args.learn else args.rate)
    # The grant MoondreamRLModule makes at setup, without joining a process group.
    connection.prepare(Collective(None, args.rank, args.processes), args.root)
    client = connection.client
    calls = [
        RolloutCall(args.finetune, _request(index), ROLLOUTS) for index in range(args.requests)
    ]
    failed = 0
    _ready()
    for first in range(0, len(calls), BATCH):
        batch = calls[first : first + BATCH]
        limit = concurrency(None, len(batch), connection.in_flight())
        try:
            connection.run(client.rollouts_many(batch, max_concurrency=limit))
        except TuningAPIError:
            failed += len(batch)
    connection.close()
    return {"failed": failed}


def sdk_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One process of the SDK: ``rollout_stream`` at its defaults."""
    import moondream
    from moondream.types import Base64EncodedImage

    ft = moondream.ft(KEY, finetune_id=args.finetune, endpoint=args.base_url)

    def requests() -> Iterator[tuple[int, dict[str, Any]]]:
        for index in range(args.requests):
            request = _request(index)
            image = Base64EncodedImage(image_url=request["image_url"])
            yield (
                index,
                {"skill": "detect", "image": image, "object": "shape"} | {"num_rollouts": ROLLOUTS},
            )

    _ready()
    answered = 0
    try:
        for _ in ft.rollout_stream(requests()):
            answered += 1
    except Exception as exc:
        print(f"SDK stream stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
    return {"failed": args.requests - answered}


def _ready() -> None:
    """Say so, and wait for the word to start: every process starts together."""
    print("ready", flush=True)
    sys.stdin.readline()


def run_together(client_name: str, base_url: str, finetune: str, **options: Any) -> int:
    """Start one worker per process, let them go at once; their failed calls in all."""
    worker = "sdk" if client_name == "sdk" else "project"
    learn = ["--learn"] if client_name == "project, rate learnt" else []
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", worker, *learn]
            + [*("--base-url", base_url, "--finetune", finetune, "--rank", str(rank))]
            + [f"--{name}={value}" for name, value in options.items()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(options["processes"])
    ]
    for worker in workers:
        assert worker.stdout is not None
        while worker.stdout.readline().strip() != "ready":
            pass
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    return sum(json.loads(worker.communicate()[0].splitlines()[-1])["failed"] for worker in workers)


def rollouts_configuration(client_name: str, rate: float, processes: int) -> dict[str, Any]:
    """One side-by-side configuration: every process started together on a fresh service."""
    from lightning_moondream.api import TuningClient

    with tempfile.TemporaryDirectory() as folder, rate_limited_serve(folder, rate) as served:
        base_url, log = served
        with TuningClient(api_key=KEY, base_url=base_url, dialect="finetunes") as client:
            finetune = client.adapters.create("bench-rate-limit", 16).adapter_id
        failed = run_together(
            client_name,
            base_url,
            finetune,
            rate=rate,
            processes=processes,
            requests=REQUESTS[rate] // processes,
            root=folder,
        )
        figures = log.figures(rate, "/rollouts")
    return {
        "client": client_name,
        "rate": rate,
        "processes": processes,
        **figures,
        "failed": failed,
    }


def quickstart(rate: float, learn: bool) -> dict[str, Any]:
    """The quickstart under DDP with 2 processes against ``serve --rate-limit rate``.

    With ``learn``, no ``requests_per_second``: the processes find the key's rate.
    """
    from lightning_moondream.api import TuningClient

    steps, validation_images = QUICKSTART[rate]
    with (
        tempfile.TemporaryDirectory() as folder,
        rate_limited_serve(folder + "/service", rate) as (base_url, log),
    ):
        command = [str(EXECUTABLES / "lightning-moondream"), "fit"]
        command += ["--config", str(ROOT / "configs" / "quickstart.yaml")]
        command += ["--trainer.max_steps", str(steps), "--trainer.strategy", "ddp"]
        command += ["--trainer.devices", "2", "--trainer.accelerator", "cpu"]
        command += ["--trainer.default_root_dir", folder + "/run"]
        command += ["--data.init_args.val.num_images", str(validation_images)]
        command += ["--model.init_args.base_url", base_url, "--model.init_args.api_key", KEY]
        if not learn:
            command += ["--model.init_args.requests_per_second", f"{rate:g}"]
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, cwd=folder)
        seconds = time.monotonic() - started
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-5000:], file=sys.stderr)
        figures = log.figures(rate)
        with TuningClient(api_key=KEY, base_url=base_url, dialect="finetunes") as client:
            applied = [adapter.train_steps for adapter in client.adapters.iter()]
    return {
        "rate": rate,
        "rate_given": not learn,
        "steps": steps,
        "applied": max((count or 0 for count in applied), default=0),
        "exit_code": done.returncode,
        "run_seconds": seconds,
        **figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-quickstart", action="store_true")
    parser.add_argument("--worker", choices=["project", "sdk"])
    parser.add_argument("--learn", action="store_true", help="project: no requests_per_second")
    for name in ("--base-url", "--finetune", "--root"):
        parser.add_argument(name)
    parser.add_argument("--rate", type=float)
    for name in ("--rank", "--processes", "--requests"):
        parser.add_argument(name, type=int)
    args = parser.parse_args()
    if args.worker:
        worker = project_worker if args.worker == "project" else sdk_worker
        print(json.dumps(worker(args)))
        return

    load_before = os.getloadavg()
    rows = [
        rollouts_configuration(client, rate, processes)
        for rate in REQUESTS
        for processes in (1, 2)
        for client in CLIENTS
    ]
    print_table(
        ["client", "R", "processes", "requests", "fraction of R", "429s / 100", "failed"],
        [
            [
                *(row["client"], row["rate"], row["processes"], row["requests"]),
                *(row["fraction_of_limit"], row["429_per_100"], row["failed"]),
            ]
            for row in rows
        ],
    )
    runs = [
        quickstart(rate, learn)
        for rate in ([] if args.skip_quickstart else QUICKSTART)
        for learn in (False, True)
    ]
    if runs:
        print_table(
            ["quickstart R", "rate", "steps", "applied", "requests", "fraction of R", "429s / 100"],
            [
                [
                    run["rate"],
                    "given" if run["rate_given"] else "learnt",
                    *(run["steps"], run["applied"], run["requests"]),
                    *(run["fraction_of_limit"], run["429_per_100"]),
                ]
                for run in runs
            ],
        )
    path = write_results(
        "rate_limit",
        {
            # Other work on the machine delays requests on their way: read figures with it.
            "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
            "rollouts_per_request": ROLLOUTS,
            "batch": BATCH,
            "rollouts": rows,
            "quickstart_ddp_2": runs,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
