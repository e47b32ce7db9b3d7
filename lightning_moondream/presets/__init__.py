"""Moondream's standard benchmarks as named presets, and their scorers."""

from lightning_moondream.presets.registry import (
    ALL,
    BENCHMARKS,
    Benchmark,
    BenchmarkDataset,
    expand_names,
    parse_benchmark,
)
from lightning_moondream.presets.scorers import (
    BenchmarkMetric,
    DetectionScores,
    MeanScore,
    PairedScores,
    ReferringScores,
    YesNoScores,
)

__all__ = [
    "ALL",
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkDataset",
    "BenchmarkMetric",
    "DetectionScores",
    "MeanScore",
    "PairedScores",
    "ReferringScores",
    "YesNoScores",
    "expand_names",
    "parse_benchmark",
]
