"""``HeldOutReport``: held-out metrics before and after training, side by side."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


class HeldOutReport(Callback):
    """Evaluate the adapter on the validation data when fit starts and when it ends.

    Prints one table with the metrics before and after training and their change, and
    keeps both in ``before`` and ``after``. Evaluation is greedy, so the two columns
    differ only by what training changed.

    Args:
        dataloader: ``"val"`` (the datamodule's validation data) or ``"test"``.
    """

    def __init__(self, dataloader: str = "val") -> None:
        if dataloader not in ("val", "test"):
            raise ValueError(f"dataloader must be 'val' or 'test', got {dataloader!r}")
        self.dataloader = dataloader
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}

    def _evaluate(self, trainer: pl.Trainer, pl_module: Any) -> dict[str, float]:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            raise RuntimeError("HeldOutReport needs the trainer to be given a datamodule")
        if self.dataloader == "test":
            datamodule.setup("test")
            loader = datamodule.test_dataloader()
        else:
            loader = datamodule.val_dataloader()
        return dict(pl_module.evaluate(loader))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before = self._evaluate(trainer, pl_module)
        rank_zero_info(
            f"Held-out {self.dataloader} metrics before training: {_inline(self.before)}"
        )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.after = self._evaluate(trainer, pl_module)
        if trainer.is_global_zero:
            print(
                format_comparison(self.before, self.after, title=f"Held-out {self.dataloader} data")
            )


def _inline(values: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.4f}" for name, value in values.items() if name != "samples")


def format_comparison(before: dict[str, float], after: dict[str, float], *, title: str) -> str:
    """A plain-text table of metrics before and after, with their change."""
    names = [name for name in after if name != "samples"]
    width = max([len(name) for name in names] + [6])
    lines = [
        f"{title} ({int(after.get('samples', 0))} samples)",
        f"{'metric':<{width}}  {'before':>8}  {'after':>8}  {'change':>8}",
    ]
    for name in names:
        old, new = before.get(name, float("nan")), after[name]
        lines.append(f"{name:<{width}}  {old:>8.4f}  {new:>8.4f}  {new - old:>+8.4f}")
    return "\n".join(lines)
