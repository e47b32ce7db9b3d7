"""A run of ``MoondreamRLModule`` under Lightning DDP on the CPU, for the multi-process tests.

Usage: ``python tests/scripts/ddp_fit.py ROOT [--devices N] [--base-url URL]
[--max-steps N] [--resume CKPT] [--accumulate K] [--fail-on-rank R] [--validate ADAPTER]
[--validate-checkpoint CKPT] [--service DIR] [--strategy ddp|ddp_spawn] [--staleness 0|1]
[--requests-per-second R]``.

Lightning starts the other processes by running this script again. Synthetic detect
data comes from ``MoondreamDataModule``; a checkpoint is kept every two steps
(``ROOT/ckpt``). Each rank writes ``ROOT/rank-<R>.json`` with what it saw. Without
``--base-url`` the module starts its own local service (data in ``--service``, by default
``ROOT/service``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.trainer.states import TrainerFn

from lightning_moondream.callbacks import RemoteCheckpoint, UsageSummary
from lightning_moondream.data import MoondreamDataModule
from lightning_moondream.module import MoondreamRLModule

_COUNTER = itertools.count()


def varying_reward(sample: Any, rollout: Any) -> float:
    """0, 1, 0, 1, ...: every group has spread, so every step is sent."""
    if os.environ.get("FAIL_ON_RANK") == os.environ.get("LOCAL_RANK", "0"):
        raise ZeroDivisionError(f"reward broken for sample {sample.id}")
    return float(next(_COUNTER) % 2)


class Report(Callback):
    """Write what this rank saw once its stage ends, inside the process that ran it
    (under ``ddp_spawn`` the launching process holds no trained state)."""

    def __init__(self, root: Path, checkpoints: RemoteCheckpoint) -> None:
        self.root, self.checkpoints = root, checkpoints

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._write(trainer, pl_module)

    def _write(self, trainer: L.Trainer, model: Any) -> None:
        result = {
            "global_step": trainer.global_step,
            "adapter_id": model.adapter.adapter_id,
            "train_steps": model.train_steps,
            "skipped_steps": model.skipped_steps,
            "metrics": {name: float(value) for name, value in trainer.callback_metrics.items()},
            "usage": model.usage.snapshot(),
            "rate": model.client.rate_limiter.rate,
            "api_checkpoints": sorted(self.checkpoints.api_checkpoints.values()),
        }
        (self.root / f"rank-{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--fail-on-rank", default=None)
    parser.add_argument("--validate", default=None, help="validate this adapter instead")
    parser.add_argument(
        "--validate-checkpoint", default=None, help="validate this Lightning checkpoint instead"
    )
    parser.add_argument("--service", type=Path, default=None, help="the local service's data")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "ddp_spawn"])
    parser.add_argument("--staleness", type=int, default=0)
    parser.add_argument("--val-images", type=int, default=5)
    parser.add_argument("--requests-per-second", type=float, default=None)
    args = parser.parse_args()
    if args.fail_on_rank is not None:
        os.environ["FAIL_ON_RANK"] = args.fail_on_rank
    validating = bool(args.validate or args.validate_checkpoint)

    options: dict[str, Any] = {
        "num_rollouts": 2,
        "collective_timeout": 60.0,
        "lr": 0.003,
        "max_staleness": args.staleness,
        "requests_per_second": args.requests_per_second,
    }
    if not validating:
        options["reward"] = varying_reward
    if args.base_url:
        options["base_url"] = args.base_url
        options["api_key"] = args.api_key
    else:
        options["local_service"] = {"data_dir": str(args.service or args.root / "service")}
    if args.validate:
        options["adapter_id"] = args.validate
    model = MoondreamRLModule(name="ddp-test", **options)
    data = MoondreamDataModule(
        train={"source": "synthetic", "num_images": 16, "skills": ["detect"]},
        val={"source": "synthetic", "num_images": args.val_images, "skills": ["detect"]},
        batch_size=2,
        num_workers=0,
    )
    checkpoints = RemoteCheckpoint(
        dirpath=args.root / "ckpt", every_n_train_steps=2, save_top_k=-1, save_last=True
    )
    trainer = L.Trainer(
        default_root_dir=args.root,
        strategy=args.strategy,
        devices=args.devices,
        accelerator="cpu",
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        limit_val_batches=None if validating else 0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        logger=L.pytorch.loggers.CSVLogger(args.root, name="logs"),
        callbacks=[
            checkpoints,
            UsageSummary(),
            LearningRateMonitor(),
            Report(args.root, checkpoints),
        ],
    )
    if validating:
        trainer.validate(model, data, ckpt_path=args.validate_checkpoint)
    else:
        trainer.fit(model, data, ckpt_path=args.resume)


if __name__ == "__main__":
    main()
