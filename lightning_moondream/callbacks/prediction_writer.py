"""``JsonlPredictionWriter``: prediction records as JSON Lines, written batch by batch."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


def _json_default(value: Any) -> Any:
    # NumPy and torch scalars or arrays, and paths, can reach records through user code.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class JsonlPredictionWriter(BasePredictionWriter):
    """Write the records of ``predict_step`` to a JSON Lines file, one line per record.

    Each batch's records (``{"id", "skill", "label", "output"}`` dicts) are appended as
    soon as the batch ends, so a long prediction run keeps what it has done if it stops.
    The file is started afresh when prediction starts, unless ``overwrite=False``; its
    parent folders are created.

    With several processes each writes its own file, ``<stem>.rank<N><suffix>``
    (``predictions.rank1.jsonl``), because appends from several processes to one file
    can interleave.

    Args:
        output_path: The JSON Lines file.
        overwrite: Empty the file when prediction starts; ``False`` appends to it.
    """

    def __init__(self, output_path: str | Path, overwrite: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_path = Path(output_path)
        self.overwrite = overwrite
        self.records_written = 0

    def path_for(self, trainer: pl.Trainer) -> Path:
        """The file this process writes: ``output_path``, rank-suffixed with several processes."""
        if trainer.world_size > 1:
            path = self.output_path
            return path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return self.output_path

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = self.path_for(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.overwrite:
            path.write_text("", encoding="utf-8")
        self.records_written = 0

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Append one line per record of the batch."""
        records = [prediction] if isinstance(prediction, Mapping) else list(prediction or [])
        if not records:
            return
        lines = "".join(
            json.dumps(record, ensure_ascii=False, default=_json_default) + "\n"
            for record in records
        )
        with self.path_for(trainer).open("a", encoding="utf-8") as file:
            file.write(lines)
        self.records_written += len(records)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(f"Wrote {self.records_written} predictions to {self.path_for(trainer)}")
