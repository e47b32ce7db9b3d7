from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from lightning_moondream.callbacks import (
    JsonlPredictionWriter,
    PredictionImageLogger,
    UsageSummary,
)
from lightning_moondream.callbacks.prediction_images import (
    PREDICTED_COLOR,
    TRUE_COLOR,
    draw_prediction,
)
from lightning_moondream.callbacks.usage import format_usage

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*configure_optimizers.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
]


@dataclass
class Sample:
    skill: str
    id: str
    label: str
    image: Any
    truth: dict[str, Any]
    image_size: tuple[int, int] | None = None

    def target(self) -> dict[str, Any]:
        return self.truth


def png_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "white").save(buffer, format="PNG")
    return buffer.getvalue()


def make_samples() -> list[Sample]:
    white = Image.new("RGB", (64, 48), "white")
    return [
        Sample(
            "detect",
            "img/0",
            "car",
            white,
            {"boxes": [{"x_min": 0.1, "y_min": 0.1, "x_max": 0.5, "y_max": 0.5}]},
        ),
        Sample("query", "q-no-image", "What color?", None, {"answers": ["white"]}),
        Sample("point", "pt 1", "the dot", png_bytes((40, 40)), {"points": [{"x": 0.5, "y": 0.5}]}),
        Sample("query", "q-1", "Which color is this?", white, {"answers": ["white", "blank"]}),
        Sample("detect", "det-2", "voiture \u00e9lectrique", white, {"boxes": []}),
    ]


def fake_output(sample: Sample) -> dict[str, Any]:
    if sample.skill == "detect":
        return {"boxes": [{"x_min": 0.2, "y_min": 0.2, "x_max": 0.6, "y_max": 0.6}]}
    if sample.skill == "point":
        return {"points": [{"x": 0.25, "y": 0.75}]}
    return {"answer": "white"}


@dataclass
class CountingUsage:
    requests: int = 0
    calls: list[str] = field(default_factory=list)

    def snapshot(self) -> dict[str, float | int]:
        return {"requests": self.requests, "bytes_sent": 3 * 2**20, "latency_p50_s": 0.25}


class TinyModule(pl.LightningModule):
    """Returns the record lists of the Moondream module, without any API."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.usage = CountingUsage()

    def training_step(self, batch: list[Sample], batch_idx: int) -> None:
        self.usage.requests += len(batch)

    def _records(self, batch: list[Sample]) -> list[dict[str, Any]]:
        self.usage.requests += len(batch)
        return [
            {"sample": sample, "output": fake_output(sample), "reward": 0.5} for sample in batch
        ]

    def validation_step(self, batch: list[Sample], batch_idx: int) -> list[dict[str, Any]]:  # type: ignore[override]
        return self._records(batch)

    def test_step(self, batch: list[Sample], batch_idx: int) -> list[dict[str, Any]]:  # type: ignore[override]
        return self._records(batch)

    def predict_step(self, batch: list[Sample], batch_idx: int) -> list[dict[str, Any]]:
        return [
            {
                "id": sample.id,
                "skill": sample.skill,
                "label": sample.label,
                "output": fake_output(sample),
            }
            for sample in batch
        ]

    def configure_optimizers(self) -> None:
        return None


def loader() -> DataLoader:
    return DataLoader(make_samples(), batch_size=2, collate_fn=list)  # type: ignore[arg-type]


def trainer(
    tmp_path: Path, callbacks: list[pl.Callback], logger: Any = False, **kwargs: Any
) -> pl.Trainer:
    options: dict[str, Any] = {
        "max_epochs": 1,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "accelerator": "cpu",
        "log_every_n_steps": 1,
        "default_root_dir": tmp_path,
        **kwargs,
    }
    return pl.Trainer(callbacks=callbacks, logger=logger, **options)


# PredictionImageLogger --------------------------------------------------------------------


def test_draw_prediction_colors_and_leaves_the_sample_untouched() -> None:
    original = Image.new("RGB", (100, 100), "white")
    sample = Sample(
        "detect",
        "a",
        "box",
        original,
        {"boxes": [{"x_min": 0.2, "y_min": 0.2, "x_max": 0.6, "y_max": 0.6}]},
    )
    drawn = draw_prediction(
        sample, {"boxes": [{"x_min": 0.4, "y_min": 0.4, "x_max": 0.8, "y_max": 0.8}]}
    )
    # Small images are enlarged to 320 pixels so the overlay is legible.
    assert drawn.size == (320, 320)
    assert drawn.getpixel((64, 160)) == TRUE_COLOR  # left edge of the true box
    assert drawn.getpixel((255, 220)) == PREDICTED_COLOR  # right edge of the predicted box
    assert drawn.getpixel((160, 300)) == (255, 255, 255)
    assert original.getcolors() == [(100 * 100, (255, 255, 255))]


def test_draw_prediction_points() -> None:
    sample = Sample(
        "point",
        "p",
        "dot",
        Image.new("RGB", (400, 400), "white"),
        {"points": [{"x": 0.5, "y": 0.5}]},
    )
    drawn = draw_prediction(sample, {"points": [{"x": 0.25, "y": 0.75}]})
    # Circles of radius 4 pixels around each point: their left edge is colored.
    assert drawn.getpixel((196, 200)) == TRUE_COLOR
    assert drawn.getpixel((96, 300)) == PREDICTED_COLOR


def test_prediction_images_saved_as_png_without_tensorboard(tmp_path: Path) -> None:
    callback = PredictionImageLogger(num_images=3)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [callback], logger=logger, limit_train_batches=1).fit(
        TinyModule(), train_dataloaders=loader(), val_dataloaders=loader()
    )
    folder = Path(logger.log_dir) / "predictions" / "epoch_000"
    names = sorted(path.name for path in folder.iterdir())
    # The query without an image is passed over: the first three samples with images.
    assert names == [
        "step_000000-00-img_0.png",
        "step_000000-01-pt_1.png",
        "step_000000-02-q-1.png",
    ]
    with Image.open(folder / names[1]) as image:
        assert image.size == (320, 320)


def test_prediction_images_not_drawn_in_sanity_check(tmp_path: Path) -> None:
    callback = PredictionImageLogger(num_images=2)
    trainer(
        tmp_path,
        [callback],
        num_sanity_val_steps=2,
        limit_train_batches=1,
        check_val_every_n_epoch=2,
    ).fit(TinyModule(), train_dataloaders=loader(), val_dataloaders=loader())
    # Validation runs every second epoch, so in one epoch only the sanity check validates.
    assert not list(tmp_path.rglob("*.png"))


def test_prediction_images_logged_to_tensorboard(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, [PredictionImageLogger(num_images=2)], logger=logger).validate(
        TinyModule(), dataloaders=loader(), verbose=False
    )
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["val_predictions/0", "val_predictions/1"]
    assert not list(tmp_path.rglob("*.png"))


def test_prediction_images_dirpath_with_tensorboard(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = PredictionImageLogger(num_images=1, dirpath=tmp_path / "pngs")
    trainer(tmp_path, [callback], logger=logger).validate(
        TinyModule(), dataloaders=loader(), verbose=False
    )
    assert [path.name for path in (tmp_path / "pngs" / "epoch_000").iterdir()] == [
        "step_000000-00-img_0.png"
    ]


@pytest.mark.parametrize("arguments", [{"num_images": 0}, {"every_n_epochs": 0}])
def test_prediction_images_reject_bad_arguments(arguments: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be at least 1"):
        PredictionImageLogger(**arguments)


# JsonlPredictionWriter --------------------------------------------------------------------


class LineCounter(pl.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts: list[int] = []

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.counts.append(len(self.path.read_text(encoding="utf-8").splitlines()))


def test_jsonl_writer_appends_each_batch(tmp_path: Path) -> None:
    path = tmp_path / "out" / "nested" / "predictions.jsonl"
    writer = JsonlPredictionWriter(path)
    counter = LineCounter(path)
    trainer(tmp_path, [writer, counter]).predict(
        TinyModule(), dataloaders=loader(), return_predictions=False
    )
    assert counter.counts == [2, 4, 5]
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [record["id"] for record in records] == ["img/0", "q-no-image", "pt 1", "q-1", "det-2"]
    assert records[0] == {
        "id": "img/0",
        "skill": "detect",
        "label": "car",
        "output": {"boxes": [{"x_min": 0.2, "y_min": 0.2, "x_max": 0.6, "y_max": 0.6}]},
    }
    assert "voiture \u00e9lectrique" in path.read_text(encoding="utf-8")


@pytest.mark.parametrize(("overwrite", "lines"), [(True, 5), (False, 10)])
def test_jsonl_writer_overwrite(tmp_path: Path, overwrite: bool, lines: int) -> None:
    path = tmp_path / "predictions.jsonl"
    for _ in range(2):
        writer = JsonlPredictionWriter(path, overwrite=overwrite)
        trainer(tmp_path, [writer]).predict(
            TinyModule(), dataloaders=loader(), return_predictions=False
        )
    assert len(path.read_text(encoding="utf-8").splitlines()) == lines


# UsageSummary -----------------------------------------------------------------------------


class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((dict(metrics), step))


def test_usage_logged_and_printed_after_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = RecordingLogger()
    module = TinyModule()
    trainer(
        tmp_path,
        [UsageSummary()],
        logger=logger,
        max_epochs=2,
        limit_train_batches=2,
        num_sanity_val_steps=1,
    ).fit(module, train_dataloaders=loader(), val_dataloaders=loader())
    usage_calls = [metrics for metrics, _ in logger.calls if "usage/requests" in metrics]
    # Two validations and two training epoch ends; the sanity check logs nothing.
    assert len(usage_calls) == 4
    assert usage_calls[-1] == {
        "usage/requests": 20.0,
        "usage/bytes_sent": 3.0 * 2**20,
        "usage/latency_p50_s": 0.25,
    }
    printed = capsys.readouterr().out
    assert "Moondream API usage (fit)" in printed
    assert any(line.split() == ["requests", "20"] for line in printed.splitlines())
    assert "3,145,728 (3.0 MiB)" in printed
    assert "0.250 s" in printed


def test_usage_printed_after_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trainer(tmp_path, [UsageSummary()]).test(TinyModule(), dataloaders=loader(), verbose=False)
    printed = capsys.readouterr().out
    assert "Moondream API usage (test)" in printed
    assert "Moondream API usage (fit)" not in printed


def test_usage_needs_a_usage_source(tmp_path: Path) -> None:
    module = TinyModule()
    del module.usage
    with pytest.raises(TypeError, match="`usage` attribute with a snapshot"):
        trainer(tmp_path, [UsageSummary()]).test(module, dataloaders=loader(), verbose=False)


def test_format_usage_table() -> None:
    table = format_usage({"requests": 1234, "retries": 0, "latency_p95_s": 1.5}, title="Usage")
    lines = table.splitlines()
    assert lines[0] == "Usage"
    assert lines[2].split() == ["metric", "value"]
    assert lines[4].split() == ["requests", "1,234"]
    assert lines[6].split() == ["latency_p95_s", "1.500", "s"]
    assert len({len(line) for line in lines[1:]}) == 1
