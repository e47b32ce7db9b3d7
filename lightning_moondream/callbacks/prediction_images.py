"""``PredictionImageLogger``: validation images with predicted and true boxes, points, answers."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image, ImageDraw, ImageFont
from typing_extensions import override

from lightning_moondream.images import ImageInput, open_image, to_rgb
from lightning_moondream.rewards import as_boxes, as_points

PREDICTED_COLOR = (230, 25, 25)
TRUE_COLOR = (20, 200, 60)
TEXT_COLOR = (255, 255, 255)
TEXT_BACKGROUND = (0, 0, 0)
MIN_SIDE = 320
"""Images whose longest side is shorter are enlarged first, so overlays stay legible."""


class EvaluatedSample(Protocol):
    """What the logger reads from a sample of a validation record."""

    skill: str
    id: str
    label: str
    image: ImageInput | None

    def target(self) -> Mapping[str, Any]:
        """The target JSON: ``{"boxes": ...}``, ``{"points": ...}`` or ``{"answers": ...}``."""
        ...


def _text_lines(sample: EvaluatedSample, output: Mapping[str, Any], reward: float | None) -> str:
    target = sample.target()
    if sample.skill == "query":
        answers = target.get("answers") or []
        accepted = [answers] if isinstance(answers, str) else list(answers)
        lines = [
            f"Q: {sample.label}",
            f"predicted: {output.get('answer')}",
            f"true: {' | '.join(accepted)}",
        ]
    else:
        key = "boxes" if sample.skill == "detect" else "points"
        true_key = "points" if target.get("points") is not None else "boxes"
        lines = [
            f"{sample.skill}: {sample.label}",
            f"predicted {len(output.get(key) or [])} {key}, true {len(target.get(true_key) or [])}"
            f" {true_key}",
        ]
    if reward is not None:
        lines.append(f"reward {reward:.3f}")
    return "\n".join(lines)


def draw_prediction(
    sample: EvaluatedSample, output: Mapping[str, Any], reward: float | None = None
) -> Image.Image:
    """Draw a sample's image with its true (green) and predicted (red) boxes and points.

    The label (or question), the predicted and accepted answers, the counts and the
    reward are written in the top-left corner.

    Args:
        sample: The evaluated sample; its ``image`` must not be ``None``.
        output: The rollout's ``output`` JSON.
        reward: The rollout's reward, if the server scored it.

    Returns:
        A new RGB image; the sample's image is not modified.
    """
    if sample.image is None:
        raise ValueError(f"sample {sample.id!r} has no image to draw on")
    image = to_rgb(open_image(sample.image)).copy()
    if max(image.size) < MIN_SIDE:
        scale = MIN_SIDE / max(image.size)
        image = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.NEAREST
        )
    width, height = image.size
    line = max(2, round(max(width, height) / 250))
    radius = max(4, round(max(width, height) / 100))
    draw = ImageDraw.Draw(image)
    target = sample.target()
    for boxes, color in ((target.get("boxes"), TRUE_COLOR), (output.get("boxes"), PREDICTED_COLOR)):
        for x_min, y_min, x_max, y_max in as_boxes(boxes or []):
            draw.rectangle(
                (x_min * width, y_min * height, x_max * width, y_max * height),
                outline=color,
                width=line,
            )
    for points, color in (
        (target.get("points"), TRUE_COLOR),
        (output.get("points"), PREDICTED_COLOR),
    ):
        for x, y in as_points(points or []):
            center = (x * width, y * height)
            draw.ellipse(
                (center[0] - radius, center[1] - radius, center[0] + radius, center[1] + radius),
                outline=color,
                width=line,
            )
    font = ImageFont.load_default(size=max(12, round(max(width, height) / 40)))
    text = _text_lines(sample, output, reward)
    margin = line * 2
    _, _, right, bottom = draw.multiline_textbbox((margin, margin), text, font=font)
    draw.rectangle((0, 0, right + margin, bottom + margin), fill=TEXT_BACKGROUND)
    draw.multiline_text((margin, margin), text, fill=TEXT_COLOR, font=font)
    return image


def _file_name(index: int, sample_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(sample_id))[:64].strip("._")
    return f"{index:02d}-{safe}.png" if safe else f"{index:02d}.png"


class PredictionImageLogger(Callback):
    """Draw the first validation predictions of an epoch and log them as images.

    Reads the records ``validation_step`` returns (``{"sample", "output", "reward"}``,
    one per sample), keeps the first ``num_images`` whose sample has an image, and at the
    end of validation draws each with true boxes and points in green, predicted ones in
    red, and the label, answers and reward as text.

    Images go to every ``TensorBoardLogger`` of the trainer (tag
    ``val_predictions/<index>``, at the global step). PNG files are written when the
    trainer has no TensorBoard logger, or always when ``dirpath`` is given: under
    ``dirpath`` (default ``<trainer.log_dir>/predictions``), in ``epoch_NNN/`` folders,
    named ``step_<global step>-<index>-<sample id>.png`` so that several validations in
    one epoch do not overwrite each other.

    Only the global rank zero draws, and nothing is drawn during the sanity check.

    Args:
        num_images: How many samples to draw per validation.
        every_n_epochs: Draw in every ``n``-th epoch of fitting (``trainer.validate`` always
            draws).
        dirpath: Folder for PNG files.

    Raises:
        ValueError: If ``num_images`` or ``every_n_epochs`` is not positive.
    """

    def __init__(
        self, num_images: int = 4, every_n_epochs: int = 1, dirpath: str | Path | None = None
    ) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {num_images}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be at least 1, got {every_n_epochs}")
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self._records: list[Mapping[str, Any]] = []
        self._active = False

    def _should_draw(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return False
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._records = []
        self._active = self._should_draw(trainer)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or len(self._records) >= self.num_images:
            return
        if not isinstance(outputs, Sequence):
            return
        for record in outputs:
            if len(self._records) >= self.num_images:
                break
            if (
                isinstance(record, Mapping)
                and getattr(record.get("sample"), "image", None) is not None
            ):
                self._records.append(record)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active or not self._records:
            return
        drawn = [
            (
                record["sample"],
                draw_prediction(record["sample"], record["output"], record.get("reward")),
            )
            for record in self._records
        ]
        self._records = []
        tensorboards = [
            logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)
        ]
        for logger in tensorboards:
            for index, (_, image) in enumerate(drawn):
                logger.experiment.add_image(
                    f"val_predictions/{index}",
                    np.asarray(image),
                    global_step=trainer.global_step,
                    dataformats="HWC",
                )
        if tensorboards and self.dirpath is None:
            return
        root = self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "predictions"
        folder = root / f"epoch_{trainer.current_epoch:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index, (sample, image) in enumerate(drawn):
            image.save(folder / f"step_{trainer.global_step:06d}-{_file_name(index, sample.id)}")
        rank_zero_info(f"Saved {len(drawn)} prediction images to {folder}")
