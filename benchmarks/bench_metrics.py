"""Cost of evaluating 5,000 images with SkillMetrics: update + compute, per mAP backend.

Detect samples are synthetic: 0 to 5 true boxes per image, predictions that find most of
them with jitter plus some false positives, 20 prompt classes. Point and query samples
are timed once (their metrics do not use a COCO backend). Each measurement is the median
of ``--repeats`` runs.

    python benchmarks/bench_metrics.py [--images 5000] [--repeats 3]

Prints a table and writes ``benchmarks/results/metrics.json``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import numpy as np
import torch
from common import write_results

from lightning_moondream.metrics import SkillMetrics

Sample = tuple[str, dict[str, Any], dict[str, Any], "tuple[int, int] | None", str]


def _box(corner: np.ndarray, side: np.ndarray) -> dict[str, float]:
    # Sides are at least 0.05 and corners at most 0.9, so every box keeps a positive area.
    x_min, y_min = np.clip(corner, 0.0, 0.9)
    x_max, y_max = np.minimum(np.array([x_min, y_min]) + np.abs(side), 1.0)
    return {
        "x_min": float(x_min),
        "y_min": float(y_min),
        "x_max": float(x_max),
        "y_max": float(y_max),
    }


def detect_samples(count: int, rng: np.random.Generator) -> list[Sample]:
    samples: list[Sample] = []
    for index in range(count):
        n_true = int(rng.integers(0, 6))
        corners, sides = rng.uniform(0.0, 0.7, (n_true, 2)), rng.uniform(0.05, 0.3, (n_true, 2))
        true = [_box(c, s) for c, s in zip(corners, sides, strict=True)]
        found = rng.uniform(size=n_true) < 0.8
        jitter = rng.normal(0.0, 0.02, (n_true, 2))
        predicted = [
            _box(c + j, s) for c, s, j, f in zip(corners, sides, jitter, found, strict=True) if f
        ]
        extra = int(rng.integers(0, 2))
        predicted += [
            _box(c, s)
            for c, s in zip(
                rng.uniform(0, 0.7, (extra, 2)), rng.uniform(0.05, 0.3, (extra, 2)), strict=True
            )
        ]
        samples.append(
            ("detect", {"boxes": predicted}, {"boxes": true}, (640, 480), f"class {index % 20}")
        )
    return samples


def point_samples(count: int, rng: np.random.Generator) -> list[Sample]:
    samples: list[Sample] = []
    for _ in range(count):
        true = rng.uniform(0.0, 1.0, (int(rng.integers(1, 4)), 2))
        predicted = true + rng.normal(0.0, 0.05, true.shape)
        samples.append(
            (
                "point",
                {"points": [{"x": float(x), "y": float(y)} for x, y in predicted]},
                {"points": [{"x": float(x), "y": float(y)} for x, y in true]},
                None,
                "the thing",
            )
        )
    return samples


def query_samples(count: int, rng: np.random.Generator) -> list[Sample]:
    answers = ["red", "two", "a cat", "yes", "no"]
    return [
        (
            "query",
            {"answer": str(rng.choice(answers)).upper()},
            {"answers": [str(rng.choice(answers)), "3"]},
            None,
            "q?",
        )
        for _ in range(count)
    ]


def measure(samples: list[Sample], backend: str | None, repeats: int) -> dict[str, float]:
    updates, computes = [], []
    for _ in range(repeats):
        metrics = SkillMetrics(map_backend=backend)  # type: ignore[arg-type]
        start = time.perf_counter()
        for sample in samples:
            metrics.update(*sample)
        middle = time.perf_counter()
        values = metrics.compute()
        end = time.perf_counter()
        metrics.reset()
        updates.append(middle - start)
        computes.append(end - middle)
    update, compute = statistics.median(updates), statistics.median(computes)
    return {
        "update_s": update,
        "compute_s": compute,
        "total_s": update + compute,
        "update_us_per_image": update / len(samples) * 1e6,
        "values": {key: round(float(value), 6) for key, value in values.items()},  # type: ignore[dict-item]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    detect = detect_samples(args.images, rng)
    # Warm-up: first imports of the COCO backends are not part of the cost.
    for backend in ("faster_coco_eval", "pycocotools"):
        measure(detect[:50], backend, 1)
    results: dict[str, Any] = {
        "images": args.images,
        "repeats": args.repeats,
        "torch_threads": 1,
        "python": platform.python_version(),
        "detect": {
            backend: measure(detect, backend, args.repeats)
            for backend in ("faster_coco_eval", "pycocotools")
        },
        "point": measure(point_samples(args.images, rng), None, args.repeats),
        "query": measure(query_samples(args.images, rng), None, args.repeats),
    }
    fast, slow = results["detect"]["faster_coco_eval"], results["detect"]["pycocotools"]
    if fast["values"] != slow["values"]:
        raise SystemExit(f"backends disagree: {fast['values']} vs {slow['values']}")
    results["compute_ratio_pycocotools_over_faster_coco_eval"] = (
        slow["compute_s"] / fast["compute_s"]
    )
    results["total_ratio_pycocotools_over_faster_coco_eval"] = slow["total_s"] / fast["total_s"]

    rows = [
        ("detect, faster_coco_eval", fast),
        ("detect, pycocotools", slow),
        ("point", results["point"]),
        ("query", results["query"]),
    ]
    print(f"SkillMetrics on {args.images} images (median of {args.repeats})")
    print(f"{'case':<26} {'update s':>9} {'compute s':>10} {'total s':>8} {'us/image':>9}")
    for name, row in rows:
        print(
            f"{name:<26} {row['update_s']:>9.2f} {row['compute_s']:>10.2f} {row['total_s']:>8.2f}"
            f" {row['update_us_per_image']:>9.0f}"
        )
    print(
        f"pycocotools / faster_coco_eval: compute x{results['compute_ratio_pycocotools_over_faster_coco_eval']:.2f},"
        f" total x{results['total_ratio_pycocotools_over_faster_coco_eval']:.2f}"
    )
    print("detect values:", fast["values"])
    print(f"wrote {write_results('metrics', results)}")


if __name__ == "__main__":
    main()
