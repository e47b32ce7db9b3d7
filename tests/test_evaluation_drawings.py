"""``--draw-worst``: picks spread over images, and file names that keep the whole label."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from PIL import Image

from lightning_moondream.api import Box
from lightning_moondream.data import DetectSample
from lightning_moondream.data.encoding import EncodedDataset
from lightning_moondream.evaluation import EvaluationReport, Prediction, write_report
from lightning_moondream.images import EncodingOptions

LONG = "the chess piece standing on the far left of the second rank, next to the white rook"
"""A label longer than names were once cut to; two labels share its first 84 characters."""

# (image, label, reward): one image whose every prompt scored zero, as on a hard dataset.
PREDICTIONS = [
    ("board-1.jpg", f"{LONG} on a1", 0.0),
    ("board-1.jpg", f"{LONG} on h1", 0.0),
    ("board-1.jpg", "black-king", 0.0),
    ("board-1.jpg", "black king", 0.0),
    ("board-2.jpg", "white pawn", 0.0),
    ("board-2.jpg", "white/queen?", 0.5),
    ("board-3.jpg", "bishop", 0.9),
]


def report_of(predictions: list[tuple[str, str, float]]) -> EvaluationReport:
    samples = [
        DetectSample(
            image=Image.new("RGB", (32, 32), "gray"),
            object=label,
            boxes=(Box(x_min=0.1, y_min=0.1, x_max=0.5, y_max=0.5),),
            id=f"{image}#detect:{label}",
        )
        for image, label, _ in predictions
    ]
    report = EvaluationReport()
    report.datasets["boards"] = EncodedDataset(cast(Any, samples), EncodingOptions())
    report.predictions = [
        Prediction(
            "boards",
            "base",
            index,
            sample.id,
            "detect",
            sample.label,
            {"objects": []},
            sample.target(),
            reward,
        )
        for index, (sample, (_, _, reward)) in enumerate(zip(samples, predictions, strict=True))
    ]
    return report


def drawn(tmp_path: Path, count: int) -> list[str]:
    written = write_report(report_of(PREDICTIONS), tmp_path, draw_worst=count)
    return [path.name for path in written if path.suffix == ".png"]


def test_every_image_gives_its_worst_before_any_gives_a_second(tmp_path: Path) -> None:
    long_name = LONG.replace(" ", "_").replace(",", "")
    assert drawn(tmp_path, 5) == [
        f"001_{long_name}_on_a1_board-1.jpg.png",
        "002_white_pawn_board-2.jpg.png",
        "003_bishop_board-3.jpg.png",
        f"004_{long_name}_on_h1_board-1.jpg.png",
        "005_white_queen_board-2.jpg.png",
    ]


def test_names_keep_whole_labels_apart_and_only_safe_characters(tmp_path: Path) -> None:
    names = drawn(tmp_path, len(PREDICTIONS))
    assert len(set(names)) == len(names) == len(PREDICTIONS)
    labels = [name.split("_", 1)[1].rsplit("_board-", 1)[0] for name in names]
    assert "black-king" in labels and "black_king" in labels
    assert sum(label.endswith(("_on_a1", "_on_h1")) for label in labels) == 2
    assert all(set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789._-") for name in names)
    folder = tmp_path / "worst" / "boards" / "base"
    assert sorted(path.name for path in folder.iterdir()) == sorted(names)


def test_a_label_too_long_for_a_file_name_keeps_a_digest_of_the_whole(tmp_path: Path) -> None:
    question = "how many " + "very " * 60 + "small pieces are there"
    report = report_of([("a.jpg", question + "?", 0.0), ("a.jpg", question + "!", 0.0)])
    names = [
        path.name for path in write_report(report, tmp_path, draw_worst=2) if path.suffix == ".png"
    ]
    assert len(set(names)) == 2 and all(len(name) < 255 for name in names)
    assert names[0].startswith("001_how_many_very_") and names[0].endswith("_a.jpg.png")
    assert names[0][4:-10] != names[1][4:-10]
