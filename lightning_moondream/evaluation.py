"""``lightning-moondream evaluate``: compare models on datasets in one table.

Every model is evaluated on every dataset with one greedy rollout per sample (temperature
0), through the evaluation loop of the module's validation
(:class:`~lightning_moondream.session.EvaluationLoop`: ``SkillMetrics`` and ``Scorer``),
so the table matches ``val/...`` and ``test/...`` logs. Greedy
decoding makes the results independent of batch size and concurrency.

Models (the table's ``path`` and ``model id`` columns say how each row answered):

- ``base``: the base model, through the inference API;
- ``FINETUNE_ID@STEP`` or ``moondream3-preview/FINETUNE_ID@STEP``: a saved ``/finetunes``
  checkpoint, through the inference API (read-only: no finetune is created or changed);
- ``ADAPTER_ID``: an existing adapter (or finetune), as it is now, through rollouts;
- ``ADAPTER_ID/chk_xxx`` or ``ADAPTER_ID@chk_xxx``: an ``/adapters`` checkpoint, evaluated
  through a new adapter created from it (deleted afterwards);
- a Lightning ``.ckpt`` file: the API checkpoint it holds, as above by its dialect.

Datasets (``--data``): a dataset folder or annotation file (``load_dataset``; ``--format``
to force one; its validation split, else test, else its only one, unless ``split`` is
named), ``synthetic``, or a YAML/JSON mapping of source options such as
``'{source: synthetic, num_images: 32, skills: [point]}'``.

Benchmarks (``--benchmark``): Moondream's standard benchmarks by name (``pope``,
``countbenchqa``, ..., or ``all``; ``NAME=FOLDER`` to read one from a folder), scored as
Moondream scores them (:mod:`lightning_moondream.presets`), in a ``scores`` column;
``--limit N`` and ``--seed S`` take the same random subset of prompts for every model.

Example:
    Base model against a checkpoint of the quickstart run, on a VOC folder::

        lightning-moondream evaluate --data /data/raccoon --format voc --model base
            --model 5f0c.../chk_002 --local-dir runs/quickstart/moondream-local-service
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lightning_moondream.api import (
    AsyncTuningClient,
    NotFoundError,
    Settings,
    TuningAPIError,
    UnsupportedFeatureError,
    UsageStats,
)
from lightning_moondream.api.inference import AsyncInferenceClient
from lightning_moondream.api.inference_models import BASE_MODEL, model_id, parse_model
from lightning_moondream.callbacks.prediction_images import draw_prediction
from lightning_moondream.data.detect import FORMATS
from lightning_moondream.data.encoding import DEFAULT_MAX_SIDE, DEFAULT_QUALITY, EncodedDataset
from lightning_moondream.data.errors import DatasetError
from lightning_moondream.data.module import build_source, stage_split
from lightning_moondream.images import EncodingOptions
from lightning_moondream.presets import BenchmarkDataset, expand_names
from lightning_moondream.scoring import RewardSpec, Sample, Scorer
from lightning_moondream.session import (
    CHECKPOINT_KEY,
    BenchmarkTally,
    EvaluationLoop,
    GreedyModel,
    ServiceChoice,
    tuning_model,
)
from lightning_moondream.session.inference import checkpoint_model, inference_model
from lightning_moondream.session.service import LOCAL_SCORES_NOTE

BASE = "base"
TEMPORARY_ADAPTER_NAME = "lightning-moondream-evaluate"

COLUMNS: tuple[tuple[str, str], ...] = (
    ("dataset", "dataset"),
    ("model", "model"),
    ("N", "samples"),
    ("mAP", "map"),
    ("mAP50", "map_50"),
    ("mAP75", "map_75"),
    ("det F1@0.5", "det_f1"),
    ("mean IoU", "det_miou"),
    ("point P", "point_precision"),
    ("point R", "point_recall"),
    ("point F1", "point_f1"),
    ("VQA acc", "vqa_accuracy"),
    ("reward", "reward"),
    ("p50 ms", "latency_p50_ms"),
    ("p95 ms", "latency_p95_ms"),
    ("requests", "requests"),
    ("path", "path"),
    ("model id", "model_id"),
)
"""Table columns: ``(heading, key in each JSON row)``."""

SCORES_COLUMN = ("scores", "scores")
"""Column of the benchmark scores, shown when a row has them."""

_TEXT_KEYS = ("dataset", "model", "path", "model_id")
_INTEGER_KEYS = ("samples", "requests")


class EvaluationError(ValueError):
    """A model, dataset or option of an evaluation cannot be used; the message names it."""


# Models --------------------------------------------------------------------------------

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_FINETUNE_CHECKPOINT = re.compile(
    rf"(?:(?P<base>{_NAME})/)?(?P<finetune_id>{_NAME})@(?P<step>[0-9]+)"
)
MODEL_FORMS = (
    "base, FINETUNE_ID@STEP, moondream3-preview/FINETUNE_ID@STEP, ADAPTER_ID, "
    "ADAPTER_ID/chk_xxx (or ADAPTER_ID@chk_xxx), or a Lightning .ckpt file"
)
"""Every form a model takes on the command line, for messages."""

INFERENCE = "inference"
ROLLOUTS = "rollouts"


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate, as named on the command line.

    The base model and ``/finetunes`` checkpoints answer through the inference API;
    adapters (and ``/adapters`` checkpoints, through an adapter created from them)
    answer with greedy rollouts.

    Attributes:
        name: The text as given, used in the table.
        adapter_id: The adapter to evaluate or to take the checkpoint of, or the
            finetune of an inference model; ``None`` for base.
        checkpoint_id: Full ``/adapters`` checkpoint id ``adapter_id/chk_xxx``, or ``None``.
        inference_model: The inference API's model id (``moondream3-preview`` or
            ``moondream3-preview/FT@STEP``), or ``None`` for an adapter.
        step: The step of a finetune checkpoint.
    """

    name: str
    adapter_id: str | None = None
    checkpoint_id: str | None = None
    inference_model: str | None = None
    step: int | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """Parse any of ``MODEL_FORMS``.

        Raises:
            EvaluationError: If the text is empty or malformed, or a ``.ckpt`` file holds
                no API checkpoint.
        """
        value = text.strip()
        if not value:
            raise EvaluationError(f"model: an empty name; use {MODEL_FORMS}")
        if value == BASE:
            return cls(value, inference_model=BASE_MODEL)
        if value.endswith(".ckpt") or Path(value).is_file():
            return cls.of_lightning_checkpoint(value)
        checkpoint = _FINETUNE_CHECKPOINT.fullmatch(value)
        if checkpoint is not None:
            finetune_id, step = checkpoint["finetune_id"], int(checkpoint["step"])
            model = model_id(finetune_id, step, base=checkpoint["base"] or BASE_MODEL)
            return cls(value, adapter_id=finetune_id, inference_model=model, step=step)
        adapter_id, separator, short = value.replace("@", "/", 1).partition("/")
        if not separator:
            return cls(value, adapter_id=value)
        if not adapter_id or not short or "/" in short or "@" in short:
            raise EvaluationError(f"model {text!r}: expected {MODEL_FORMS}")
        return cls(value, adapter_id=adapter_id, checkpoint_id=f"{adapter_id}/{short}")

    @classmethod
    def of_lightning_checkpoint(cls, path: str) -> ModelSpec:
        """The model of the API checkpoint a Lightning checkpoint file holds.

        Raises:
            EvaluationError: If the file is missing or holds no API checkpoint.
        """
        if not Path(path).is_file():
            raise EvaluationError(f"model {path!r}: no such Lightning checkpoint file")
        state = torch.load(path, map_location="cpu", weights_only=False).get(CHECKPOINT_KEY)
        if not state or not state.get("checkpoint_id"):
            raise EvaluationError(
                f"model {path!r}: the Lightning checkpoint holds no Moondream API checkpoint"
            )
        model = checkpoint_model(state)
        if model is not None:
            step = parse_model(model).step
            return cls(path, adapter_id=state["adapter_id"], inference_model=model, step=step)
        return cls(path, adapter_id=state["adapter_id"], checkpoint_id=state["checkpoint_id"])

    @property
    def path(self) -> str:
        """How the model answers: ``inference`` or ``rollouts``."""
        return ROLLOUTS if self.inference_model is None else INFERENCE

    @property
    def temporary(self) -> bool:
        """Whether evaluating it creates an adapter that is deleted afterwards."""
        return self.checkpoint_id is not None


@dataclass(frozen=True)
class OpenedModel:
    """A model ready to answer.

    Attributes:
        spec: The model as named.
        model_id: What answers: the inference model id, or the adapter id of the rollouts.
        created: Whether ``model_id`` is an adapter made for the evaluation alone.
    """

    spec: ModelSpec
    model_id: str
    created: bool = False

    @property
    def shown_id(self) -> str:
        """The model id the table shows (an ``/adapters`` checkpoint by its id)."""
        return self.spec.checkpoint_id or self.model_id

    def greedy(
        self,
        client: AsyncTuningClient,
        inference: AsyncInferenceClient,
        settings: Settings,
        scorer: Scorer,
        max_concurrency: int,
    ) -> GreedyModel:
        """The model as the evaluation loop takes it."""
        if self.spec.path == INFERENCE:
            return inference_model(inference, self.model_id, settings, max_concurrency)
        return tuning_model(client, self.model_id, settings, scorer, max_concurrency)


async def open_model(client: AsyncTuningClient, spec: ModelSpec) -> OpenedModel:
    """Check that ``spec`` exists and return what answers for it (an adapter made if needed).

    Raises:
        EvaluationError: Naming the model and what exists, if it does not exist.
    """
    if spec.adapter_id is None:
        return OpenedModel(spec, str(spec.inference_model))
    try:
        adapter = await client.adapters.get(spec.adapter_id)
    except NotFoundError as exc:
        raise EvaluationError(
            f"model {spec.name!r}: no adapter or finetune {spec.adapter_id!r} at this service "
            f"(see `lightning-moondream adapters list`): {exc.message}"
        ) from exc
    if spec.inference_model is not None:
        await _check_checkpoint(client, spec)
        return OpenedModel(spec, spec.inference_model)
    if spec.checkpoint_id is None:
        return OpenedModel(spec, adapter.adapter_id)
    try:
        created = await client.adapters.create(
            TEMPORARY_ADAPTER_NAME, adapter.rank, spec.checkpoint_id
        )
    except (NotFoundError, UnsupportedFeatureError) as exc:
        raise EvaluationError(
            f"model {spec.name!r}: no checkpoint {spec.checkpoint_id!r} to start an adapter "
            f"from ({exc}); {await _checkpoints_of(client, spec.adapter_id)}"
        ) from exc
    return OpenedModel(spec, created.adapter_id, created=True)


async def _check_checkpoint(client: AsyncTuningClient, spec: ModelSpec) -> None:
    """Refuse a finetune checkpoint the finetune does not keep, listing those it keeps."""
    finetune_id = str(spec.adapter_id)
    if client.dialect != "finetunes":
        raise EvaluationError(
            f"model {spec.name!r}: {finetune_id!r} is an adapter of the /adapters dialect, "
            f"whose checkpoints are not models; {await _checkpoints_of(client, finetune_id)}"
        )
    steps = [checkpoint.step async for checkpoint in client.checkpoints.iter(finetune_id, 100)]
    if spec.step not in steps:
        raise EvaluationError(
            f"model {spec.name!r}: finetune {finetune_id} keeps no checkpoint at step "
            f"{spec.step}; {await _checkpoints_of(client, finetune_id)}"
        )


async def _checkpoints_of(client: AsyncTuningClient, adapter_id: str) -> str:
    """What checkpoints an adapter keeps, as models to name (with their steps)."""
    names = [
        f"{checkpoint.ref} (step {checkpoint.step})"
        if checkpoint.step is not None
        else checkpoint.ref
        async for checkpoint in client.checkpoints.iter(adapter_id, 100)
    ]
    if not names:
        return f"{adapter_id} keeps no checkpoint"
    return f"{adapter_id} keeps: {', '.join(names)}"


# Datasets ------------------------------------------------------------------------------


def load_data(spec: str, format: str | None = None) -> tuple[str, Dataset]:
    """Build a named dataset of samples from a ``--data`` value.

    Args:
        spec: A folder or annotation file, ``synthetic``, or a YAML mapping of source
            options (``{source: ..., ...}``, as ``MoondreamDataModule`` takes).
        format: Dataset format for a path (``voc``, ``coco``, ``yolo``, ``jsonl``).

    Returns:
        A name for the table (the folder or file name and the split, e.g.
        ``raccoon (valid)``; ``synthetic`` or its mapping as given) and the dataset,
        built from its validation split, else its test split, else its only one, where
        the source has splits and none is named.

    Raises:
        EvaluationError: If the mapping is not valid YAML or has no ``source``.
    """
    text = spec.strip()
    if text.startswith("{"):
        try:
            options = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise EvaluationError(f"data {spec!r}: not a valid YAML mapping: {exc}") from exc
        if not isinstance(options, dict) or "source" not in options:
            raise EvaluationError(f"data {spec!r}: a mapping needs a 'source' key")
    elif text == "synthetic":
        options = {"source": text}
    else:
        options = {"source": text} if format is None else {"source": text, "format": format}
    source = str(options["source"])
    if source == "synthetic":
        return text, build_source(options, "test")
    options["split"] = options.get("split") or stage_split(source, options.get("format"), "val")
    details = [str(options[key]) for key in ("split", "skill") if options.get(key)]
    name = Path(source).name or source
    if Path(source).is_file() and Path(source).suffix in (".yaml", ".yml", ".json", ".xml"):
        name = Path(source).parent.name or name
    name += f" ({', '.join(details)})" if details else ""
    return name, build_source(options, "val")


def load_benchmarks(
    specs: Sequence[str], limit: int | None = None, seed: int = 0
) -> list[tuple[str, Dataset]]:
    """Build the datasets of ``--benchmark`` values (``all`` expands to every benchmark).

    Raises:
        EvaluationError: If a benchmark name is unknown or ``limit`` is below 1.
    """
    datasets: list[tuple[str, Dataset]] = []
    for spec in expand_names(specs):
        try:
            dataset = BenchmarkDataset(spec, limit=limit, seed=seed)
        except DatasetError:
            raise
        except ValueError as exc:
            raise EvaluationError(f"benchmark {spec!r}: {exc}") from exc
        datasets.append((dataset.benchmark.name, dataset))
    return datasets


# Running ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """One sample's greedy output and score.

    Attributes:
        dataset: Dataset name.
        model: Model name.
        index: Position of the sample in its dataset.
        sample_id: The sample's id.
        skill: ``detect``, ``point`` or ``query``.
        label: The object phrase or question.
        output: The rollout's ``output`` JSON.
        target: The ground truth JSON.
        reward: The sample's reward (the ranking of ``--draw-worst``).
    """

    dataset: str
    model: str
    index: int
    sample_id: str
    skill: str
    label: str
    output: dict[str, Any]
    target: dict[str, Any]
    reward: float

    def to_json(self) -> dict[str, Any]:
        """The prediction as one JSON object (a line of ``predictions.jsonl``)."""
        return {
            "dataset": self.dataset,
            "model": self.model,
            "index": self.index,
            "id": self.sample_id,
            "skill": self.skill,
            "label": self.label,
            "output": self.output,
            "target": self.target,
            "reward": self.reward,
        }


@dataclass
class EvaluationReport:
    """What an evaluation produced: one row per dataset and model, and every prediction."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)
    datasets: dict[str, EncodedDataset] = field(default_factory=dict)
    """The encoded datasets by name, to draw samples from."""
    note: str | None = None
    """A line shown above the table: what scored it, when that is not Moondream."""

    def columns(self) -> tuple[tuple[str, str], ...]:
        """The table's columns: ``COLUMNS``, and the benchmark scores when there are any."""
        if any("scores" in row for row in self.rows):
            return (*COLUMNS, SCORES_COLUMN)
        return COLUMNS

    def markdown(self) -> str:
        """The table as Markdown; ``-`` where a dataset has no sample of a metric's skill."""
        columns = self.columns()
        lines = [
            "| " + " | ".join(heading for heading, _ in columns) + " |",
            "|" + "|".join("---" if key in _TEXT_KEYS else "---:" for _, key in columns) + "|",
        ]
        for row in self.rows:
            lines.append("| " + " | ".join(_cell(row, key) for _, key in columns) + " |")
        table = "\n".join(lines)
        return f"{self.note}\n\n{table}" if self.note else table


def _cell(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, Mapping):
        return ", ".join(f"{name} {score:.4f}" for name, score in value.items())
    if key in _TEXT_KEYS:
        return str(value).replace("|", "\\|")
    if key in _INTEGER_KEYS:
        return str(int(value))
    if key.startswith("latency_"):
        return f"{value:.1f}"
    return f"{value:.4f}"


def _encode_batch(samples: EncodedDataset, indices: range) -> list[Sample]:
    return [samples[index] for index in indices]


async def _evaluate_pair(
    client: AsyncTuningClient,
    inference: AsyncInferenceClient,
    opened: OpenedModel,
    dataset_name: str,
    samples: EncodedDataset,
    *,
    batch_size: int,
    max_concurrency: int,
    settings: Settings,
    scorer: Scorer,
    advance: Callable[[int], None],
) -> tuple[dict[str, Any], list[Prediction]]:
    model_name = opened.spec.name
    benchmark = samples.dataset if isinstance(samples.dataset, BenchmarkDataset) else None
    tally = (
        BenchmarkTally(benchmark.benchmark.metric(), benchmark.group)
        if benchmark is not None
        else None
    )
    model = opened.greedy(client, inference, settings, scorer, max_concurrency)
    loop = EvaluationLoop(model, scorer, tallies=[tally] if tally is not None else [])
    predictions: list[Prediction] = []
    # A fresh counter per dataset and model, so latencies and requests are theirs alone.
    client.usage = inference.usage = UsageStats()
    for start in range(0, len(samples), batch_size):
        indices = range(start, min(start + batch_size, len(samples)))
        # Encoding off the event loop, which also serves the in-process local service.
        batch: list[Sample] = await asyncio.to_thread(_encode_batch, samples, indices)
        for scored in await loop.answer(batch):
            sample = scored.sample
            predictions.append(
                Prediction(
                    dataset_name,
                    model_name,
                    scored.index,
                    sample.id,
                    sample.skill,
                    sample.label,
                    scored.output,
                    sample.target(),
                    scored.reward,
                )
            )
        advance(len(batch))
    return _row(dataset_name, opened, loop.results(), client.usage, tally), predictions


def _row(
    dataset: str,
    opened: OpenedModel,
    values: dict[str, float],
    usage: UsageStats,
    tally: BenchmarkTally | None,
) -> dict[str, Any]:
    """One row of the table: the loop's results, the requests' latencies and count."""
    row: dict[str, Any] = {
        "dataset": dataset,
        "model": opened.spec.name,
        "path": opened.spec.path,
        "model_id": opened.shown_id,
        "samples": int(values["samples"]),
    }
    for _, key in COLUMNS[3:13]:
        row[key] = values.get(key)
    # Only the answering calls: an inference row's every request is one.
    latencies = usage.latencies("POST /rollouts" if opened.spec.path == ROLLOUTS else None)
    p50, p95 = np.percentile(latencies, [50, 95]) if latencies else (None, None)
    row["latency_p50_ms"] = None if p50 is None else float(p50) * 1000
    row["latency_p95_ms"] = None if p95 is None else float(p95) * 1000
    row["requests"] = usage.requests
    if tally is not None:
        row["scores"] = tally.compute()
    return row


async def evaluate_async(
    client: AsyncTuningClient,
    datasets: Sequence[tuple[str, Dataset]],
    models: Sequence[str | ModelSpec],
    *,
    batch_size: int = 32,
    max_concurrency: int = 8,
    reward: RewardSpec = None,
    eval_settings: Mapping[str, Any] | None = None,
    encoding: EncodingOptions | None = None,
    progress: bool = True,
) -> EvaluationReport:
    """Evaluate every model on every dataset through ``client``.

    Every model is opened (and a bad one reported) before any is evaluated; temporary
    adapters are deleted at the end, also on failure.

    Args:
        client: The API client.
        datasets: ``(name, dataset of samples)`` pairs.
        models: Model names (see the module docstring) or parsed specs.
        batch_size: Samples per batch of requests.
        max_concurrency: Rollouts requests in flight at once.
        reward: Reward setting, as ``MoondreamRLModule``'s ``reward``.
        eval_settings: Generation settings; temperature 0 (greedy) unless given.
        encoding: Image size cap and JPEG quality of the images sent.
        progress: Show a progress bar.

    Raises:
        EvaluationError: For a bad option or a model that does not exist.
    """
    if batch_size < 1 or max_concurrency < 1:
        raise EvaluationError("batch size and max concurrency must be at least 1")
    names = [name for name, _ in datasets]
    if len(set(names)) != len(names):
        raise EvaluationError(f"datasets need distinct names, got {names}")
    specs = [spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec) for spec in models]
    settings = Settings.model_validate({"temperature": 0.0, **dict(eval_settings or {})})
    report = EvaluationReport(datasets=_encoded(datasets, encoding))
    opened: list[OpenedModel] = []
    inference = AsyncInferenceClient.for_tuning(client)
    try:
        for spec in specs:
            opened.append(await open_model(client, spec))
        await _evaluate_all(
            client,
            inference,
            report,
            opened,
            batch_size=batch_size,
            max_concurrency=max_concurrency,
            settings=settings,
            scorer=Scorer(reward),
            progress=progress,
        )
    finally:
        await _delete_temporary(client, opened)
    return report


def _encoded(
    datasets: Sequence[tuple[str, Dataset]], encoding: EncodingOptions | None
) -> dict[str, EncodedDataset]:
    """Each dataset by name, its images encoded as ``encoding`` says (default cap and quality)."""
    options = encoding or EncodingOptions(max_side=DEFAULT_MAX_SIDE, quality=DEFAULT_QUALITY)
    return {name: EncodedDataset(dataset, options) for name, dataset in datasets}


async def _evaluate_all(
    client: AsyncTuningClient,
    inference: AsyncInferenceClient,
    report: EvaluationReport,
    opened: list[OpenedModel],
    *,
    batch_size: int,
    max_concurrency: int,
    settings: Settings,
    scorer: Scorer,
    progress: bool,
) -> None:
    """Evaluate every opened model on every dataset of ``report``, into its rows."""
    total = sum(len(encoded) for encoded in report.datasets.values()) * len(opened)
    with tqdm(total=total, unit="sample", disable=not progress) as bar:
        for name, encoded in report.datasets.items():
            for model in opened:
                bar.set_description(f"{name} / {model.spec.name}")
                row, predictions = await _evaluate_pair(
                    client,
                    inference,
                    model,
                    name,
                    encoded,
                    batch_size=batch_size,
                    max_concurrency=max_concurrency,
                    settings=settings,
                    scorer=scorer,
                    advance=bar.update,
                )
                report.rows.append(row)
                report.predictions.extend(predictions)


async def _delete_temporary(client: AsyncTuningClient, opened: list[OpenedModel]) -> None:
    """Delete the adapters made for the evaluation alone, warning where one cannot be."""
    for model in opened:
        adapter_id = model.model_id
        if model.created:
            # One failed clean-up must neither hide the run's own error nor leave
            # the other temporary adapters behind.
            try:
                await client.adapters.delete(adapter_id)
            except TuningAPIError as exc:
                warnings.warn(
                    f"could not delete temporary adapter {adapter_id}: {exc}", stacklevel=3
                )


# Output ----------------------------------------------------------------------------------


_MAX_NAME_PART = 120
"""Longest part (a label, an image, a dataset) of a drawing's path; file names stop at 255 bytes."""


def _slug(text: str) -> str:
    """``text`` in safe characters, whole unless longer than ``_MAX_NAME_PART``.

    A longer one is cut and ends in a digest of the whole, so two never share a name.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "item"
    if len(slug) <= _MAX_NAME_PART:
        return slug
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{slug[: _MAX_NAME_PART - len(digest) - 1]}-{digest}"


def image_of(prediction: Prediction) -> str:
    """The image a prediction's sample is about: its id up to ``#`` (``IMAGE#skill:label``)."""
    return prediction.sample_id.partition("#")[0]


def worst_predictions(predictions: Sequence[Prediction], count: int) -> list[Prediction]:
    """The ``count`` lowest-reward predictions, spread over images.

    Round by round, each image gives its next-lowest prediction, the round ordered by
    reward: every image's worst comes before any image's second worst, so that one
    image whose prompts all scored zero does not fill the picks. Ties go by position,
    so the same samples are picked on every run.
    """
    by_image: dict[str, list[Prediction]] = {}
    for prediction in sorted(predictions, key=lambda p: (p.reward, p.index)):
        by_image.setdefault(image_of(prediction), []).append(prediction)
    picks: list[Prediction] = []
    depth = 0
    while len(picks) < count:
        round_ = [ranked[depth] for ranked in by_image.values() if depth < len(ranked)]
        if not round_:
            break
        picks += sorted(round_, key=lambda p: (p.reward, p.index))
        depth += 1
    return picks[:count]


def _drawing_name(rank: int, prediction: Prediction) -> str:
    """``RANK_LABEL_IMAGE.png``: the whole label (or question), then the image it is about."""
    return f"{rank:03d}_{_slug(prediction.label)}_{_slug(image_of(prediction))}.png"


def write_report(
    report: EvaluationReport,
    out: str | Path,
    *,
    save_predictions: bool = False,
    draw_worst: int = 0,
) -> list[Path]:
    """Write ``results.md`` and ``results.json``, and optionally predictions and drawings.

    Args:
        report: The evaluation's report.
        out: Output folder (created).
        save_predictions: Also write every prediction to ``predictions.jsonl``.
        draw_worst: Draw the ``draw_worst`` lowest-reward samples of every dataset and
            model, spread over images (``worst_predictions``), as PNGs under
            ``worst/<dataset>/<model>/RANK_LABEL_IMAGE.png``, true boxes and points in
            green and predicted ones in red (the drawing of ``PredictionImageLogger``).

    Returns:
        The files written.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "results.md", folder / "results.json"]
    written[0].write_text(report.markdown() + "\n")
    columns = [{"heading": heading, "key": key} for heading, key in report.columns()]
    results = {
        "columns": columns,
        "rows": report.rows,
        **({"note": report.note} if report.note else {}),
    }
    written[1].write_text(json.dumps(results, indent=2) + "\n")
    if save_predictions:
        path = folder / "predictions.jsonl"
        with path.open("w") as handle:
            for prediction in report.predictions:
                handle.write(json.dumps(prediction.to_json()) + "\n")
        written.append(path)
    if draw_worst > 0:
        groups: dict[tuple[str, str], list[Prediction]] = {}
        for prediction in report.predictions:
            groups.setdefault((prediction.dataset, prediction.model), []).append(prediction)
        for (dataset, model), predictions in groups.items():
            worst = worst_predictions(predictions, draw_worst)
            target = folder / "worst" / _slug(dataset) / _slug(model)
            target.mkdir(parents=True, exist_ok=True)
            for rank, prediction in enumerate(worst, start=1):
                sample = report.datasets[dataset][prediction.index]
                path = target / _drawing_name(rank, prediction)
                draw_prediction(sample, prediction.output, prediction.reward).save(path)
                written.append(path)
    return written


# Command line ----------------------------------------------------------------------------


def connect(local_dir: str | None, base_url: str | None) -> AsyncTuningClient:
    """The client of an evaluation, chosen as the module chooses (``ServiceChoice``).

    ``--local-dir`` uses the local service keeping its data there; without it, a key
    (``MOONDREAM_API_KEY``) or a base URL selects a remote service, and with neither the
    local service runs in this process on ``./moondream-local-service``, where a run
    rooted in the current folder keeps its adapters.
    """
    return ServiceChoice(base_url=base_url, local_dir=local_dir).async_client()


def local_service_note(local_dir: str | None, base_url: str | None) -> str | None:
    """The line heading a table scored by the local service (its stand-in model), else ``None``."""
    choice = ServiceChoice(base_url=base_url, local_dir=local_dir)
    if not choice.uses_local_service:
        return None
    return (
        f"Scored by the local tuning service (data in {choice.data_dir()}), an offline "
        f"stand-in for Moondream Cloud: {LOCAL_SCORES_NOTE}."
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-moondream evaluate``."""
    parser = argparse.ArgumentParser(
        prog="lightning-moondream evaluate",
        description="Evaluate models on datasets (one greedy rollout per sample) and write "
        "one table. The API key comes from MOONDREAM_API_KEY; with neither a key nor "
        "--base-url, the local tuning service runs in this process.",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        help="dataset folder or annotation file, 'synthetic', or a YAML mapping such as "
        "'{source: synthetic, num_images: 32}'; repeat for several",
    )
    parser.add_argument(
        "--benchmark",
        action="append",
        default=[],
        metavar="NAME[=SOURCE]",
        help="a Moondream benchmark (countbenchqa, pope, chartqa, textvqa, docvqa, "
        "realworldqa, mmstar, tallyqa, coco, refcoco) or 'all', read from the local Hugging Face "
        "cache, or from SOURCE (a save_to_disk folder or parquet files); repeat for several",
    )
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N", help="prompts per benchmark (a subset)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help=f"{MODEL_FORMS}; repeat for several",
    )
    parser.add_argument("--format", choices=FORMATS, default=None)
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    parser.add_argument(
        "--max-concurrency", type=int, default=8, help="rollouts requests in flight at once"
    )
    parser.add_argument("--out", default="runs/evaluate", help="output folder")
    parser.add_argument("--save-predictions", action="store_true", help="write predictions.jsonl")
    parser.add_argument(
        "--draw-worst",
        type=int,
        default=0,
        metavar="K",
        help="draw the K lowest-reward samples of each dataset and model as PNGs, each "
        "image's worst first",
    )
    parser.add_argument(
        "--max-side",
        type=int,
        default=DEFAULT_MAX_SIDE,
        help="longest image side sent, in pixels",
    )
    add_service_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def add_service_options(parser: argparse.ArgumentParser) -> None:
    """``--local-dir`` or ``--base-url`` (``ServiceChoice`` decides with the environment)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local-dir", default=None, help="data folder of a local tuning service")
    where.add_argument(
        "--base-url", default=None, help="API base URL (default: MOONDREAM_TUNING_URL or the cloud)"
    )


async def _run(args: argparse.Namespace, datasets: list[tuple[str, Dataset]]) -> EvaluationReport:
    note = local_service_note(args.local_dir, args.base_url)
    if note is not None:
        print(note, flush=True)
    client = connect(args.local_dir, args.base_url)
    try:
        report = await evaluate_async(
            client,
            datasets,
            args.model,
            batch_size=args.batch_size,
            max_concurrency=args.max_concurrency,
            encoding=EncodingOptions(max_side=args.max_side, quality=DEFAULT_QUALITY),
            progress=not args.no_progress,
        )
    finally:
        await client.close()
    report.note = note
    return report


def evaluate_main(argv: Sequence[str]) -> int:
    """``lightning-moondream evaluate``: returns the exit status (0, or 1 on an error)."""
    args = build_parser().parse_args(list(argv))
    if args.draw_worst < 0:
        print("error: --draw-worst must not be negative", file=sys.stderr)
        return 1
    if not args.data and not args.benchmark:
        print("error: give at least one --data or --benchmark", file=sys.stderr)
        return 1
    try:
        models = [ModelSpec.parse(text) for text in args.model]
        args.model = models
        datasets = [load_data(spec, args.format) for spec in args.data]
        datasets += load_benchmarks(args.benchmark, args.limit, args.seed)
        report = asyncio.run(_run(args, datasets))
    except (EvaluationError, DatasetError, TuningAPIError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    written = write_report(
        report, args.out, save_predictions=args.save_predictions, draw_worst=args.draw_worst
    )
    print(report.markdown())
    print(f"\nwrote {len(written)} files under {args.out}")
    return 0
