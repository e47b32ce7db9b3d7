"""Requests that teach: pre-rollout filtering and dynamic sampling under a request budget.

Half of the training prompts are always solved: a reward function scores every rollout
of them 1, so their groups never spread and teach nothing; the other half are scored by
the ground truth (detect F1) and spread. A :class:`Session` trains an adapter of the
local service's reference policy (in this process) on synthetic detect scenes, batch
after batch in a shuffled order, until each budget of ``/rollouts`` requests is spent,
where it answers held-out test scenes greedily (ground-truth reward, no always-solved
prompt); it does so every ``--eval-every`` requests too, for the best reward reached
within the budget, as a run keeping its best checkpoint by validation reward would.

Configurations: every prompt sampled (``skip_prompts=False``); prompts skipped after
flat groups (``skip_prompts=True``); and skipping with dynamic sampling
(``max_extra_requests``). Measured per run: requests per applied group with signal
(requests counted from the rollouts scored, over the groups the applied train steps
took), the held-out reward at the budget and the best within it. Each configuration
runs with the same seeds (data order, service).

Run: ``python benchmarks/bench_signal.py [--quick]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from typing import Any

from common import print_table, write_results

from lightning_moondream.api import Rollout
from lightning_moondream.data import SyntheticShapes
from lightning_moondream.images import EncodingOptions
from lightning_moondream.scoring import Sample, Scorer, ground_truth
from lightning_moondream.session import ServiceChoice, Session, SessionOptions

ENCODING = EncodingOptions(max_side=128)
CONFIGS: dict[str, dict[str, Any]] = {
    "every prompt": {"skip_prompts": False},
    "skip_prompts": {"skip_prompts": True},
    "skip_prompts + max_extra_requests=4": {"skip_prompts": True, "max_extra_requests": 4},
}
HEADERS = [
    "configuration",
    "requests",
    "steps",
    "groups",
    "requests/group",
    "of every",
    "skipped",
    "held-out",
    "best",
]


class HalfSolvedReward:
    """1 for every rollout of the always-solved prompts, the ground truth for the others.

    It counts the training rollouts it scores (not the held-out ones), so requests are
    counted where they are spent.
    """

    def __init__(self, solved: set[str]) -> None:
        self.solved = solved
        self.rollouts = 0
        self.counting = True

    def __call__(self, sample: Sample, rollout: Rollout) -> float:
        if self.counting:
            self.rollouts += 1
        return 1.0 if sample.id in self.solved else ground_truth(sample, rollout)


def scenes(split: str, count: int) -> list[Any]:
    """``count`` detect samples of synthetic scenes, encoded in advance (not measured)."""
    dataset = SyntheticShapes(split, num_images=count, skills=("detect",), tasks_per_image=1)
    return [dataset[index].encoded(ENCODING) for index in range(len(dataset))]


def train_run(
    options: dict[str, Any],
    train: list[Any],
    held_out: list[Any],
    *,
    seed: int,
    batch_size: int,
    num_rollouts: int,
    budgets: list[int],
    eval_every: int,
    lr: float | None,
) -> dict[int, dict[str, float]]:
    """Train until each budget of requests is spent; what it cost and learnt by then.

    The held-out reward is measured at each budget, and every ``eval_every`` requests
    for the best reached so far (as a run keeping its best checkpoint would).
    """
    reward = HalfSolvedReward({sample.id for sample in train[::2]})
    order = random.Random(seed)
    batches = [held_out[i : i + batch_size] for i in range(0, len(held_out), batch_size)]
    with tempfile.TemporaryDirectory() as folder:
        session = Session(
            SessionOptions(num_rollouts=num_rollouts, **options),
            ServiceChoice(local_dir=folder, local_options={"seed": seed}),
            Scorer(reward),
        )

        def held_out_reward() -> float:
            reward.counting = False
            value = session.evaluate(batches)["reward"]
            reward.counting = True
            return value

        steps = groups = skipped = 0
        best, next_evaluation = held_out_reward(), eval_every
        results: dict[int, dict[str, float]] = {}
        try:
            while len(results) < len(budgets):
                epoch = order.sample(train, len(train))
                for start in range(0, len(epoch), batch_size):
                    session.teacher.teach(epoch[start : start + batch_size], steps, steps)
                    metrics = session.step(lr).metrics
                    steps += 1
                    groups += int(metrics["groups"])
                    skipped += int(metrics.get("skipped_prompts", 0))
                    requests = reward.rollouts // num_rollouts
                    if requests >= next_evaluation:
                        best = max(best, held_out_reward())
                        next_evaluation += eval_every
                    budget = budgets[len(results)]
                    if requests >= budget:
                        final = held_out_reward()
                        results[budget] = {
                            "requests": requests,
                            "steps": steps,
                            "groups": groups,
                            "requests_per_group": requests / max(groups, 1),
                            "skipped_prompts": skipped,
                            "held_out_reward": final,
                            "best_held_out_reward": max(best, final),
                        }
                        if len(results) == len(budgets):
                            break
        finally:
            session.close()
    return results


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each configuration's means over its seeds, and its requests per group over the baseline's."""
    summary = {
        name: {key: statistics.fmean(run[key] for run in results) for key in results[0]}
        for name, results in runs.items()
    }
    every = summary["every prompt"]["requests_per_group"]
    for values in summary.values():
        values["of_every_prompt"] = values["requests_per_group"] / every
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, the smallest budget")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32, help="training prompts (half solved)")
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-rollouts", type=int, default=16)
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=[160, 320, 640], help="/rollouts requests per run"
    )
    parser.add_argument(
        "--eval-every", type=int, default=40, help="requests between held-out evaluations"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of each train step")
    args = parser.parse_args()
    seeds, budgets = (1, args.budgets[:1]) if args.quick else (args.seeds, sorted(args.budgets))
    train, held_out = scenes("train", args.prompts), scenes("test", args.held_out)
    runs: dict[int, dict[str, list[dict[str, float]]]] = {
        budget: {name: [] for name in CONFIGS} for budget in budgets
    }
    for seed in range(seeds):
        for name, options in CONFIGS.items():
            by_budget = train_run(
                options,
                train,
                held_out,
                seed=seed,
                batch_size=args.batch_size,
                num_rollouts=args.num_rollouts,
                budgets=budgets,
                eval_every=args.eval_every,
                lr=args.lr,
            )
            for budget, result in by_budget.items():
                print(f"seed {seed} {name}, budget {budget}: {result}", flush=True)
                runs[budget][name].append(result)
    results: dict[str, Any] = {}
    for budget in budgets:
        summary = summarize(runs[budget])
        print(f"budget {budget} requests ({budget / len(train):.0f} per prompt):")
        print_table(
            HEADERS,
            [
                [
                    name,
                    round(values["requests"]),
                    round(values["steps"]),
                    round(values["groups"]),
                    values["requests_per_group"],
                    values["of_every_prompt"],
                    round(values["skipped_prompts"]),
                    values["held_out_reward"],
                    values["best_held_out_reward"],
                ]
                for name, values in summary.items()
            ],
        )
        results[str(budget)] = {"summary": summary, "runs": runs[budget]}
    setup = {
        "prompts": args.prompts,
        "always_solved": args.prompts // 2,
        "held_out": args.held_out,
        "batch_size": args.batch_size,
        "num_rollouts": args.num_rollouts,
        "seeds": seeds,
        "lr": args.lr,
        "eval_every": args.eval_every,
        "policy": "reference (local service, in process)",
    }
    path = write_results("signal", {"setup": setup, "budgets": results})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
