"""Evaluation data split over the processes of a run, each sample seen exactly once."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import DistributedSampler


class UnpaddedShardSampler(DistributedSampler):
    """Every ``num_replicas``-th sample from ``rank`` on, in order, with no padding.

    ``DistributedSampler`` repeats samples so that every process gets as many; counted
    twice, they would bias validation and test metrics. Here processes may get one
    sample fewer instead, which evaluation allows: it has no collective per batch.
    Being a ``DistributedSampler``, Lightning leaves it in place.

    Args:
        dataset: The evaluation dataset.
        num_replicas: Number of processes.
        rank: This process's rank.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)  # type: ignore[arg-type]
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[Any]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
