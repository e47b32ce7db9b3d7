"""``BenchmarkWatch``: Moondream's benchmarks during validation, to see forgetting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_moondream.data.encoding import DEFAULT_MAX_SIDE, DEFAULT_QUALITY
from lightning_moondream.images import EncodingOptions
from lightning_moondream.presets import BenchmarkDataset, expand_names
from lightning_moondream.session import BenchmarkTally


class BenchmarkWatch(Callback):
    """Score the current adapter on a subset of benchmarks at every validation.

    After each validation epoch (not the sanity check) it answers a fixed, seeded subset
    of every benchmark with one greedy rollout per prompt (``pl_module.evaluate``, the
    evaluation loop of validation) and logs ``bench/<name>/<metric>``, e.g. ``bench/pope/f1``, next to the task's own
    metrics; a ``ModelCheckpoint`` can monitor them. Under several processes each scores
    a share of the prompts and the metrics' summed states are combined.

    The benchmarks are opened at ``setup``, so a missing dataset stops the run before any
    training, naming what to place where.

    Args:
        benchmarks: Benchmark names (``"all"`` for every one), or ``NAME=SOURCE`` to read
            one from a folder or parquet files.
        limit: Prompts per benchmark (a seeded subset); ``None`` for all.
        seed: Seed of the subset (the same prompts at every validation).
        batch_size: Prompts per batch of requests.
        every_n_epochs: Score every n-th validation only.
        max_side: Longest image side sent, in pixels.
    """

    def __init__(
        self,
        benchmarks: Sequence[str] = ("pope", "countbenchqa"),
        limit: int | None = 100,
        seed: int = 0,
        batch_size: int = 16,
        every_n_epochs: int = 1,
        max_side: int = DEFAULT_MAX_SIDE,
    ) -> None:
        if batch_size < 1 or every_n_epochs < 1:
            raise ValueError("batch_size and every_n_epochs must be at least 1")
        self.specs = expand_names(list(benchmarks))
        self.limit = limit
        self.seed = seed
        self.batch_size = batch_size
        self.every_n_epochs = every_n_epochs
        self.options = EncodingOptions(max_side=max_side, quality=DEFAULT_QUALITY)
        self.datasets: list[BenchmarkDataset] = []
        self.scores: dict[str, float] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.datasets:
            self.datasets = [
                BenchmarkDataset(spec, limit=self.limit, seed=self.seed) for spec in self.specs
            ]

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        logged: dict[str, float] = {}
        for dataset in self.datasets:
            values = self._score(dataset, pl_module, trainer.global_rank, trainer.world_size)
            name = dataset.benchmark.name
            logged.update({f"bench/{name}/{key}": value for key, value in values.items()})
        # The metrics are already combined over processes.
        pl_module.log_dict(logged, sync_dist=False)
        self.scores = logged

    def _score(
        self, dataset: BenchmarkDataset, pl_module: Any, rank: int, world_size: int
    ) -> Mapping[str, float]:
        indices = list(range(rank, len(dataset), world_size))
        tally = BenchmarkTally(
            dataset.benchmark.metric(), lambda seen: dataset.group(indices[seen])
        )
        batches = (
            [
                dataset[index].encoded(self.options)
                for index in indices[start : start + self.batch_size]
            ]
            for start in range(0, len(indices), self.batch_size)
        )
        pl_module.evaluate(batches, tallies=[tally])
        return tally.compute()
