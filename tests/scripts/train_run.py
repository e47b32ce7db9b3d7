"""A training run in its own process, for the crash and security tests.

Usage: ``python tests/scripts/train_run.py ROOT [--service-dir DIR | --base-url URL]
[--dialect auto|adapters|finetunes] [--max-steps N] [--resume CKPT] [--pause-at STEP]``.

Trains a ``MoondreamRLModule`` on synthetic detect samples with checkpoints every two
steps (``ROOT/ckpt``, plus ``last.ckpt``) and prints one JSON line of results. With
``--pause-at`` it writes ``ROOT/paused`` after that step and waits to be killed. The API key, if any, comes from
``MOONDREAM_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, cast

import lightning as L
from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support import alternating_reward, detect_samples
from torch.utils.data import DataLoader

from lightning_moondream.callbacks import RemoteCheckpoint
from lightning_moondream.module import MoondreamRLModule


class PauseAt(Callback):
    """Stop making progress after a given step, so the process is killed mid-run."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(str(self.step))
            time.sleep(600)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--service-dir", default=None)
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--dialect", default="auto", choices=("auto", "adapters", "finetunes"))
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--pause-at", type=int, default=None)
    args = parser.parse_args()

    options: dict[str, Any] = {
        "num_rollouts": 2,
        "reward": alternating_reward(),
        "max_concurrency": 2,
        "dialect": args.dialect,
    }
    if args.base_url:
        options["base_url"] = args.base_url
    else:
        options["local_service"] = {"data_dir": args.service_dir, "policy": "constant"}
    model = MoondreamRLModule(name="crash-test", **options)
    callbacks: list[Callback] = [
        RemoteCheckpoint(
            dirpath=args.root / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1
        ),
        OnExceptionCheckpoint(dirpath=args.root / "ckpt"),
    ]
    if args.pause_at is not None:
        callbacks.append(PauseAt(args.pause_at, args.root / "paused"))
    trainer = L.Trainer(
        default_root_dir=args.root,
        max_steps=args.max_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
    )
    samples = detect_samples("train", 2 * args.max_steps)
    trainer.fit(
        model, DataLoader(cast(Any, samples), batch_size=2, collate_fn=list), ckpt_path=args.resume
    )
    adapter = model.adapter
    print(
        json.dumps(
            {
                "global_step": trainer.global_step,
                "adapter_id": adapter.adapter_id,
                "resumed_from": model.session.resumed_from,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
