"""Multi-process training: steps per second of ``MoondreamRLModule`` at 1 and 2 DDP processes.

The reward is CPU-bound pure Python: 20 ms of CPU time per rollout in a loop that holds
the GIL, so one process is bound by scoring and threads cannot help. Under DDP each
process samples and scores its own shard of the batch; rank 0 sends the one train step.

One ``lightning-moondream serve`` in a child process (HTTP on 127.0.0.1, no-compute
``constant`` policy, no injected latency) serves every run, so the service costs little
and the reward dominates. Its data lives in memory (``/dev/shm`` where there is one): on
disk, the weight file and SQLite commit of a train step now and then take a few hundred
milliseconds, noise from the service's storage that is not what is measured.

The global batch is the same in both runs: 1 process x 8 samples, 2 processes x 4, each
sample with 4 rollouts, so 32 rollouts and 0.64 s of reward CPU per global step.
``max_staleness=0``: each step is applied before the next batch is sampled.

Each process count is a Lightning run of its own in a child process (this script with
``--worker``; Lightning starts rank 1 by running that command again). Every rank stamps
the start and end of each global step; steps per second are rank 0's measured steps over
the time they took, after the warm-up steps. The two runs alternate for ``--rounds``
rounds and each keeps its best round: the 2-process run needs both cores, so anything
else the machine runs slows it most, and the best round is the least disturbed.

Run: ``python benchmarks/bench_ddp.py [--steps 24] [--warmup 4] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from common import encoded_samples, print_table, quiet_trainer, serve_http, write_results
from pydantic import SecretStr
from torch.utils.data import DataLoader

from lightning_moondream.api import Rollout
from lightning_moondream.data import SampleList, collate_samples
from lightning_moondream.module import MoondreamRLModule

GLOBAL_BATCH, NUM_ROLLOUTS, REWARD_CPU_S, GOAL = 8, 4, 0.020, 1.6
PROCESSES = (1, 2)
_flip = itertools.count()
_reward_cpu = [0.0]


def busy_reward(sample: Any, rollout: Rollout) -> float:
    """0, 1, 0, 1, ... after ``REWARD_CPU_S`` of pure-Python work on this thread's CPU clock.

    The thread's own clock counts only this work, whatever else the process runs, so
    every rollout costs the same CPU however busy the machine is.
    """
    started = time.thread_time()
    deadline = started + REWARD_CPU_S
    value = 0
    while time.thread_time() < deadline:
        for index in range(1000):
            value = (value * 31 + index) % 1_000_003
    _reward_cpu[0] += time.thread_time() - started
    return float(next(_flip) % 2)


class StepClock(pl.Callback):
    """Start and end of each global step on this rank, and the reward CPU it took."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.reward_cpu: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())
        _reward_cpu[0] = 0.0

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(time.perf_counter())
        self.reward_cpu.append(_reward_cpu[0])


def worker(args: argparse.Namespace) -> None:
    """One Lightning run on ``args.devices`` processes; each rank writes its timings."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    per_rank = GLOBAL_BATCH // args.devices
    module = MoondreamRLModule(
        num_rollouts=NUM_ROLLOUTS,
        max_staleness=0,
        reward=busy_reward,
        base_url=args.base_url,
        api_key=SecretStr("bench"),
    )
    clock = StepClock()
    strategy = "ddp" if args.devices > 1 else "auto"
    trainer = quiet_trainer(args.out, args.steps, clock, devices=args.devices, strategy=strategy)
    # One epoch: DDP's sampler gives each rank its own share of these samples.
    data = SampleList(encoded_samples(GLOBAL_BATCH * args.steps))
    loader: DataLoader[Any] = DataLoader(data, batch_size=per_rank, collate_fn=collate_samples)
    trainer.fit(module, loader)
    result = {
        "starts": clock.starts,
        "ends": clock.ends,
        "reward_cpu_s": clock.reward_cpu,
        "global_step": trainer.global_step,
        "train_steps": module.train_steps,
        "skipped_steps": module.skipped_steps,
    }
    Path(args.out, f"rank-{trainer.global_rank}.json").write_text(json.dumps(result))


def ideal_step_s(processes: int) -> float:
    """A step's reward CPU shared evenly over the processes, with nothing else."""
    return GLOBAL_BATCH * NUM_ROLLOUTS * REWARD_CPU_S / processes


def run(processes: int, base_url: str, steps: int, out: Path) -> list[dict[str, Any]]:
    """Each rank's timings of a run on ``processes`` processes, launched as a child."""
    out.mkdir(parents=True)
    command = [sys.executable, __file__, "--worker", "--devices", str(processes)]
    command += ["--steps", str(steps), "--base-url", base_url, "--out", str(out)]
    log = out / "log.txt"
    with log.open("w") as sink:
        finished = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=False)
    if finished.returncode != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise RuntimeError(f"the {processes}-process run exited with {finished.returncode}")
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(processes)]


def summary(ranks: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Steps per second after ``warmup`` steps, and where each rank's step time went."""
    ends = ranks[0]["ends"]
    measured = ends[warmup - 1 :]
    intervals = [later - earlier for earlier, later in itertools.pairwise(measured)]
    per_rank = []
    for rank in ranks:
        starts, stops = rank["starts"][warmup:], rank["ends"][warmup:]
        # A step's hooks on this rank (sampling, scoring, gathering, the train step), and
        # the time between steps (the loader and Lightning's own work).
        in_step = [stop - start for start, stop in zip(starts, stops, strict=True)]
        between = [
            start - stop for stop, start in zip(rank["ends"][warmup - 1 : -1], starts, strict=True)
        ]
        per_rank.append(
            {
                "in_step_s": statistics.median(in_step),
                "between_steps_s": statistics.median(between),
                "reward_cpu_s": statistics.median(rank["reward_cpu_s"][warmup:]),
            }
        )
    return {
        "steps_per_s": len(intervals) / (measured[-1] - measured[0]),
        "ideal_step_s": ideal_step_s(len(ranks)),
        "median_step_s": statistics.median(intervals),
        "measured_steps": len(intervals),
        "train_steps": ranks[0]["train_steps"],
        "skipped_steps": ranks[0]["skipped_steps"],
        "ranks": per_rank,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="global steps per run")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each process count")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not 1 <= args.warmup < args.steps - 1:
        parser.error("--warmup must be at least 1 and leave two steps or more to measure")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    rounds: dict[int, list[dict[str, Any]]] = {processes: [] for processes in PROCESSES}
    memory = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with (
        tempfile.TemporaryDirectory() as folder,
        tempfile.TemporaryDirectory(dir=memory) as service,
        serve_http(service, "--policy", "constant") as base_url,
    ):
        for index, processes in itertools.product(range(args.rounds), PROCESSES):
            out = Path(folder, f"round-{index}", f"processes-{processes}")
            rounds[processes].append(
                summary(run(processes, base_url, args.steps, out), args.warmup)
            )
    results = {
        processes: max(runs, key=lambda result: result["steps_per_s"])
        for processes, runs in rounds.items()
    }
    single = results[1]["steps_per_s"]
    rows = [
        [
            processes,
            GLOBAL_BATCH // processes,
            result["steps_per_s"],
            result["median_step_s"],
            ideal_step_s(processes),
            ideal_step_s(processes) / result["median_step_s"],
            result["steps_per_s"] / single,
        ]
        for processes, result in results.items()
    ]
    ranks = [
        [processes, rank, times["in_step_s"], times["between_steps_s"], times["reward_cpu_s"]]
        for processes, result in results.items()
        for rank, times in enumerate(result["ranks"])
    ]
    print(
        f"global batch {GLOBAL_BATCH} x {NUM_ROLLOUTS} rollouts, reward {REWARD_CPU_S * 1000:.0f} ms "
        f"CPU per rollout, max_staleness=0, {args.steps - args.warmup} measured steps, "
        f"best of {args.rounds} round(s)"
    )
    print_table(
        ["processes", "batch/process", "steps/s", "step_s", "ideal_s", "of_ideal", "speedup"], rows
    )
    print("\nmedian seconds per step on each rank:")
    print_table(["processes", "rank", "in_step", "between_steps", "reward_cpu"], ranks)
    for processes, runs in rounds.items():
        each = ", ".join(f"{result['steps_per_s']:.3f}" for result in runs)
        print(f"steps/s of each round at {processes} process(es): {each}")
    speedup = results[2]["steps_per_s"] / single
    print(f"2 processes: {speedup:.2f}x (goal {GOAL}x): {'PASS' if speedup >= GOAL else 'FAIL'}")
    path = write_results(
        "ddp",
        {
            "global_batch": GLOBAL_BATCH,
            "num_rollouts": NUM_ROLLOUTS,
            "reward_cpu_s_per_rollout": REWARD_CPU_S,
            "max_staleness": 0,
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "rounds": args.rounds,
            "steps_per_s_of_each_round": {
                str(processes): [result["steps_per_s"] for result in runs]
                for processes, runs in rounds.items()
            },
            "results": {str(processes): result for processes, result in results.items()},
            "speedup": speedup,
            "goal": GOAL,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
