"""``MoondreamDataModule``: datasets of samples for each stage, encoded in workers.

Each stage (``train``, ``val``, ``test``, ``predict``) takes a source:

- a path, read by :func:`~lightning_moondream.data.detect.load_dataset`; without a
  ``split``, a dataset with splits (of any format, Hugging Face included) gives each
  stage its own by :mod:`~lightning_moondream.data.splits` (training: ``train``;
  validation: ``val``/``valid``/``validation``, else ``test``; test and predict:
  ``test``, else validation; a single split serves every stage), so one folder can be
  named for both ``train`` and ``val``;
- ``"synthetic"``: :class:`~lightning_moondream.data.sources.synthetic.SyntheticShapes`
  of the stage's split (``train``, ``val``, ``test``; ``test`` for predict);
- a mapping ``{"source": <path or "synthetic">, **options}``, the options going to
  ``load_dataset`` or ``SyntheticShapes``;
- a list of such mappings, each with a ``weight``, mixed: in training, every draw
  picks a source with probability proportional to its weight, then a sample of it
  uniformly (an epoch has as many draws as the sources have samples in total); in
  evaluation every sample of every source is used once, in order;
- a ``torch.utils.data.Dataset`` of samples.

A batch is a list of samples (no tensor stacking): ``batch_size`` is the number of
groups per train step. Images are encoded to data URLs in the DataLoader workers, with
a cache per worker, so the training loop only sends requests.

YAML example (LightningCLI)::

    data:
      class_path: lightning_moondream.data.MoondreamDataModule
      init_args:
        train: {source: synthetic, num_images: 256, skills: [detect]}
        val: {source: synthetic, num_images: 32, skills: [detect]}
        batch_size: 8
        num_workers: 2
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Sized
from typing import Any, cast

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    RandomSampler,
    WeightedRandomSampler,
)

from lightning_moondream.data.detect import dataset_splits, load_dataset
from lightning_moondream.data.encoding import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_MAX_SIDE,
    DEFAULT_QUALITY,
    EncodedDataset,
)
from lightning_moondream.data.sharding import UnpaddedShardSampler
from lightning_moondream.data.sources.synthetic import SyntheticShapes
from lightning_moondream.data.splits import Stage, choose_split
from lightning_moondream.images import EncodingOptions

SourceSpec = str | dict[str, Any] | list[dict[str, Any]] | Dataset | None
"""A stage's source: a path, ``"synthetic"``, an options mapping, a weighted list, or a dataset."""

SYNTHETIC = "synthetic"
_STAGE_SPLITS: dict[str, Stage] = {
    "train": "train",
    "val": "val",
    "test": "test",
    "predict": "test",
}


def collate_samples(batch: list[Any]) -> list[Any]:
    """Keep a batch as the list of samples it is."""
    return list(batch)


def build_source(
    spec: str | Mapping[str, Any] | Dataset,
    split: Stage,
    seed: int = 0,
    *,
    phrase_labels: bool = False,
) -> Dataset:
    """Build one dataset of samples from a source spec (not a weighted list).

    Args:
        spec: A path, ``"synthetic"``, a mapping with ``source`` and options, or a dataset.
        split: The stage's split: synthetic sources use it, and a path without a
            ``split`` option the split of the same kind (see the module docstring).
        seed: Default seed of negative draws and synthetic scenes.
        phrase_labels: Default of a path's ``phrase_labels``: class names written as
            phrases in prompts (``black-king`` as ``black king``).

    Raises:
        ValueError: If a mapping has no ``source``.
    """
    if isinstance(spec, Dataset):
        return spec
    if isinstance(spec, str):
        spec = {"source": spec}
    options = {key: value for key, value in spec.items() if key not in ("source", "weight")}
    source = spec.get("source")
    if source is None:
        raise ValueError(f"a source mapping needs a 'source' key, got {dict(spec)!r}")
    if isinstance(source, Dataset):
        return source
    options.setdefault("seed", seed)
    if source == SYNTHETIC:
        options.setdefault("split", split)
        return SyntheticShapes(**options)
    if options.get("split") is None:
        options["split"] = stage_split(str(source), options.get("format"), split)
    options.setdefault("phrase_labels", phrase_labels)
    return load_dataset(str(source), **options)


def stage_split(path: str, format: str | None, stage: Stage) -> str | None:
    """The split of a dataset path a stage reads when none is named; ``None`` if it has none.

    Raises:
        DatasetError: If the dataset has several splits and none of the stage's kind.
    """
    return choose_split(dataset_splits(path, format), None, path, stage)


def build_mixture(
    specs: Sequence[Mapping[str, Any]],
    split: Stage,
    seed: int = 0,
    *,
    phrase_labels: bool = False,
) -> tuple[ConcatDataset, list[float]]:
    """Build the datasets of a weighted list and one sampling weight per sample.

    A sample of source ``k`` gets ``weight_k / len_k``, so each draw picks source ``k``
    with probability proportional to ``weight_k``. ``split``, ``seed`` and
    ``phrase_labels`` are as for :func:`build_source`.

    Raises:
        ValueError: If a weight is negative, all are zero, or a source is empty.
    """
    datasets: list[Dataset] = []
    per_sample: list[float] = []
    for position, spec in enumerate(specs):
        weight = float(spec.get("weight", 1.0))
        if weight < 0:
            raise ValueError(f"source {position}: weight must not be negative, got {weight}")
        dataset = build_source(spec, split, seed, phrase_labels=phrase_labels)
        length = len(dataset)  # type: ignore[arg-type]
        if length == 0:
            raise ValueError(f"source {position} ({spec.get('source')!r}) has no samples")
        datasets.append(dataset)
        per_sample.extend([weight / length] * length)
    if not any(per_sample):
        raise ValueError("at least one source needs a positive weight")
    return ConcatDataset(datasets), per_sample


class MoondreamDataModule(LightningDataModule):
    """Samples for training and evaluation, batched as lists, encoded in workers.

    Args:
        train: Source of training samples (see the module docstring).
        val: Source of validation samples.
        test: Source of test samples.
        predict: Source of prediction samples.
        batch_size: Samples (groups) per train step.
        eval_batch_size: Samples per evaluation batch; default ``batch_size``.
        num_workers: DataLoader worker processes that encode images.
        max_side: Longest image side sent, in pixels; ``None`` sends full size.
        jpeg_quality: JPEG quality of the images sent, 1 to 95.
        seed: Seed of shuffling, mixing, negative draws and synthetic scenes.
        shuffle: Shuffle training samples each epoch.
        cache_mb: Encoded-image cache of each worker, in MiB; 0 disables it.
        phrase_labels: Write class names as phrases in the prompts of dataset paths
            (``black-king`` as ``black king``, ``traffic_light`` as ``traffic light``),
            unless a source mapping says otherwise.
    """

    def __init__(
        self,
        train: SourceSpec = None,
        val: SourceSpec = None,
        test: SourceSpec = None,
        predict: SourceSpec = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_side: int | None = DEFAULT_MAX_SIDE,
        jpeg_quality: int = DEFAULT_QUALITY,
        seed: int = 0,
        shuffle: bool = True,
        cache_mb: int = DEFAULT_CACHE_BYTES // (1024 * 1024),
        phrase_labels: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must not be negative, got {num_workers}")
        self.sources: dict[str, SourceSpec] = {
            "train": train,
            "val": val,
            "test": test,
            "predict": predict,
        }
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.options = EncodingOptions(max_side=max_side, quality=jpeg_quality)
        self.seed = seed
        self.shuffle = shuffle
        self.cache_bytes = cache_mb * 1024 * 1024
        self.phrase_labels = phrase_labels
        self.datasets: dict[str, Dataset] = {}
        self._weights: dict[str, list[float]] = {}
        # Datasets are not hyperparameters; only plain settings are saved.
        self.save_hyperparameters(
            ignore=[name for name, spec in self.sources.items() if isinstance(spec, Dataset)]
        )

    def _build(self, stage: str) -> None:
        if stage in self.datasets or self.sources[stage] is None:
            return
        spec = self.sources[stage]
        split = _STAGE_SPLITS[stage]
        if isinstance(spec, list):
            self.datasets[stage], self._weights[stage] = build_mixture(
                spec, split, self.seed, phrase_labels=self.phrase_labels
            )
        else:
            self.datasets[stage] = build_source(
                spec,  # type: ignore[arg-type]
                split,
                self.seed,
                phrase_labels=self.phrase_labels,
            )

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a Lightning stage needs (annotations read, no images)."""
        needed = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
        }.get(stage or "", tuple(self.sources))
        for name in needed:
            self._build(name)

    def _dataset(self, stage: str) -> Dataset:
        self._build(stage)
        if stage not in self.datasets:
            raise ValueError(f"no {stage} source was given to MoondreamDataModule")
        return self.datasets[stage]

    def _loader(self, stage: str, batch_size: int, sampler: Any = None) -> DataLoader:
        encoded = EncodedDataset(self._dataset(stage), self.options, cache_bytes=self.cache_bytes)
        return DataLoader(
            encoded,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            # Workers keep their encoded-image caches from one epoch to the next.
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Training batches: lists of encoded samples, shuffled or mixed by weight."""
        dataset = self._dataset("train")
        generator = torch.Generator().manual_seed(self.seed)
        sampler: Any = None
        if "train" in self._weights:
            weights = self._weights["train"]
            sampler = WeightedRandomSampler(weights, len(weights), generator=generator)
        elif self.shuffle:
            sampler = RandomSampler(dataset, generator=generator)  # type: ignore[arg-type]
        return self._loader("train", self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in order; with several processes, each gets its share once."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches, in order; with several processes, each gets its share once."""
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Prediction batches, in order; with several processes, each gets its share once."""
        return self._eval_loader("predict")

    def _eval_loader(self, stage: str) -> DataLoader:
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return self._loader(stage, self.eval_batch_size)
        dataset = cast(Sized, self._dataset(stage))
        if len(dataset) < trainer.world_size:
            raise ValueError(
                f"the {stage} data has {len(dataset)} samples for {trainer.world_size} processes: "
                "each process needs at least one (use fewer devices, or more data)"
            )
        sampler = UnpaddedShardSampler(dataset, trainer.world_size, trainer.global_rank)
        return self._loader(stage, self.eval_batch_size, sampler)
