"""Auto-labelling: a model's detections and points written as labelling tools read them."""

from lightning_moondream.labelling.formats import LABEL_FORMATS, write_labels
from lightning_moondream.labelling.run import (
    PROGRESS_FILE,
    Answer,
    LabellingError,
    LabellingRun,
    label_images,
    label_images_async,
)

__all__ = [
    "LABEL_FORMATS",
    "PROGRESS_FILE",
    "Answer",
    "LabellingError",
    "LabellingRun",
    "label_images",
    "label_images_async",
    "write_labels",
]
