"""Callbacks for Moondream training: checkpoints, reports, predictions, usage and benchmarks."""

from lightning_moondream.callbacks.benchmark_watch import BenchmarkWatch
from lightning_moondream.callbacks.held_out_report import HeldOutReport
from lightning_moondream.callbacks.prediction_images import PredictionImageLogger
from lightning_moondream.callbacks.prediction_writer import JsonlPredictionWriter
from lightning_moondream.callbacks.remote_checkpoint import RemoteCheckpoint
from lightning_moondream.callbacks.usage import UsageSource, UsageSummary

__all__ = [
    "BenchmarkWatch",
    "HeldOutReport",
    "JsonlPredictionWriter",
    "PredictionImageLogger",
    "RemoteCheckpoint",
    "UsageSource",
    "UsageSummary",
]
