"""Callbacks for Moondream training: checkpoints, reports, predictions and usage."""

from lightning_moondream.callbacks.held_out_report import HeldOutReport
from lightning_moondream.callbacks.prediction_images import PredictionImageLogger
from lightning_moondream.callbacks.prediction_writer import JsonlPredictionWriter
from lightning_moondream.callbacks.remote_checkpoint import RemoteCheckpoint
from lightning_moondream.callbacks.usage import UsageSource, UsageSummary

__all__ = [
    "HeldOutReport",
    "JsonlPredictionWriter",
    "PredictionImageLogger",
    "RemoteCheckpoint",
    "UsageSource",
    "UsageSummary",
]
