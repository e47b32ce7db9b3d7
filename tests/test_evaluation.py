"""``lightning-moondream evaluate`` against the local service, on generated data."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sized
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
from PIL import Image

from lightning_moondream.api import AsyncTuningClient, RolloutCall, Settings, TuningClient
from lightning_moondream.callbacks.prediction_images import draw_prediction
from lightning_moondream.cli import main
from lightning_moondream.data import SyntheticShapes
from lightning_moondream.data.synthetic import make_scene
from lightning_moondream.evaluation import (
    COLUMNS,
    EvaluationError,
    ModelSpec,
    evaluate_async,
    load_data,
    write_report,
)
from lightning_moondream.images import EncodingOptions

SYNTHETIC = "{source: synthetic, num_images: 3, skills: [detect, point, query]}"
METRIC_KEYS = [key for _, key in COLUMNS[3:13]]


def write_voc_tree(root: Path, images: int = 3) -> Path:
    """A flat VOC folder: JPEGs of synthetic scenes with their shapes as objects."""
    root.mkdir(parents=True)
    for index in range(images):
        scene = make_scene(1000 + index)
        size = scene.image.width
        scene.image.save(root / f"img{index}.jpg", quality=95)
        objects = "".join(
            f"<object><name>{obj.shape}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{obj.box[0] * size:.0f}</xmin><ymin>{obj.box[1] * size:.0f}</ymin>"
            f"<xmax>{obj.box[2] * size:.0f}</xmax><ymax>{obj.box[3] * size:.0f}</ymax>"
            "</bndbox></object>"
            for obj in scene.objects
        )
        (root / f"img{index}.xml").write_text(
            f"<annotation><filename>img{index}.jpg</filename><size><width>{size}</width>"
            f"<height>{size}</height><depth>3</depth></size>{objects}</annotation>"
        )
    return root


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A local service folder holding an adapter trained for two steps and its checkpoint."""
    root = tmp_path_factory.mktemp("evaluation")
    data_dir = root / "service"
    samples = SyntheticShapes("train", num_images=4, skills=("detect",))
    encoded = [samples[i].encoded(EncodingOptions(max_side=128)) for i in range(len(samples))]
    with TuningClient.local(data_dir=data_dir) as client:
        adapter = client.adapters.create("trained", rank=16)
        for step in range(2):
            batch = encoded[step * 4 : step * 4 + 4]
            calls = [
                RolloutCall(
                    adapter.adapter_id,
                    sample.to_request(Settings(temperature=1.0)),
                    4,
                    sample.ground_truth(),
                )
                for sample in batch
            ]
            responses = client.rollouts_many(calls, max_concurrency=4)
            groups = [response.to_group(response.rewards) for response in responses]
            client.train_step(adapter.adapter_id, groups)
        checkpoint = client.checkpoints.save(adapter.adapter_id)
    return {
        "data_dir": data_dir,
        "voc": write_voc_tree(root / "voc"),
        "adapter_id": adapter.adapter_id,
        "checkpoint_id": checkpoint.checkpoint_id,
    }


def adapter_ids(data_dir: Path) -> set[str]:
    with TuningClient.local(data_dir=data_dir) as client:
        return {adapter.adapter_id for adapter in client.adapters.iter(limit=100)}


def run_async(data_dir: Path, models: list[str], **options: Any) -> Any:
    async def run() -> Any:
        client = AsyncTuningClient.local(data_dir=data_dir)
        try:
            return await evaluate_async(
                client, [load_data(SYNTHETIC)], models, progress=False, **options
            )
        finally:
            await client.close()

    return asyncio.run(run())


def test_evaluate_command_writes_one_table_of_every_dataset_and_model(
    service: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter_id, checkpoint_id = service["adapter_id"], service["checkpoint_id"]
    at_checkpoint = checkpoint_id.replace("/", "@")
    before = adapter_ids(service["data_dir"])
    out = tmp_path / "out"
    arguments = ["evaluate", "--data", str(service["voc"]), "--format", "voc"]
    arguments += ["--data", SYNTHETIC, "--model", "base", "--model", adapter_id]
    arguments += ["--model", at_checkpoint, "--local-dir", str(service["data_dir"])]
    arguments += ["--out", str(out), "--batch-size", "4", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 0

    data = json.loads((out / "results.json").read_text())
    assert [column["key"] for column in data["columns"]] == [key for _, key in COLUMNS]
    rows = data["rows"]
    assert [(row["dataset"], row["model"]) for row in rows] == [
        (dataset, model)
        for dataset in ("voc", SYNTHETIC)
        for model in ("base", adapter_id, at_checkpoint)
    ]
    sizes = {
        "voc": len(cast(Sized, load_data(str(service["voc"]), "voc")[1])),
        SYNTHETIC: len(cast(Sized, load_data(SYNTHETIC)[1])),
    }
    for row in rows:
        assert set(row) == {key for _, key in COLUMNS}
        assert row["samples"] == sizes[row["dataset"]] > 0
        assert row["requests"] >= row["samples"]
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"]
        for key in METRIC_KEYS:
            if row["dataset"] == "voc" and key.startswith(("point", "vqa")):
                assert row[key] is None, key
            else:
                assert 0.0 <= row[key] <= 1.0, key
    # The checkpoint holds every step the adapter has, so both evaluate the same weights.
    for dataset in ("voc", SYNTHETIC):
        by_model = {row["model"]: row for row in rows if row["dataset"] == dataset}
        assert {key: by_model[adapter_id][key] for key in METRIC_KEYS} == {
            key: by_model[at_checkpoint][key] for key in METRIC_KEYS
        }

    note, _, table_text = (out / "results.md").read_text().partition("\n\n")
    assert note.startswith("Scored by the local tuning service") and "not Moondream" in note
    table = table_text.splitlines()
    assert table[0].startswith("| dataset | model | N | mAP | mAP50 | mAP75 | det F1@0.5 |")
    assert len(table) == 2 + len(rows)
    assert "| voc | base | " in table[2] and "| - |" in table[2]
    assert "\n".join(table) in capsys.readouterr().out
    # Temporary adapters (base and the checkpoint's) are gone; the trained one stays.
    assert adapter_ids(service["data_dir"]) == before


def test_results_do_not_depend_on_batch_size_or_concurrency(service: dict[str, Any]) -> None:
    models = ["base", service["adapter_id"]]
    serial = run_async(service["data_dir"], models, batch_size=1, max_concurrency=1)
    parallel = run_async(service["data_dir"], models, batch_size=7, max_concurrency=5)

    def results(report: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        rows = [
            {key: row[key] for key in ["dataset", "model", *METRIC_KEYS]} for row in report.rows
        ]
        return rows, [prediction.to_json() for prediction in report.predictions]

    assert results(serial) == results(parallel)
    assert serial.rows[0]["requests"] == serial.rows[0]["samples"]


def test_predictions_and_worst_samples_are_written(service: dict[str, Any], tmp_path: Path) -> None:
    report = run_async(service["data_dir"], ["base"], batch_size=8)
    written = write_report(report, tmp_path, save_predictions=True, draw_worst=3)

    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == report.rows[0]["samples"]
    first = json.loads(lines[0])
    assert {"id", "skill", "label", "output", "target", "reward"} <= set(first)

    drawings = sorted(path for path in written if path.suffix == ".png")
    folder = tmp_path / "worst" / "source_synthetic_num_images_3_skills_detect_point_query" / "base"
    # Each of the three images gives its lowest-reward sample.
    images = {p.sample_id.partition("#")[0] for p in report.predictions}
    worst = sorted(
        (
            min(
                (p for p in report.predictions if p.sample_id.startswith(f"{image}#")),
                key=lambda p: (p.reward, p.index),
            )
            for image in images
        ),
        key=lambda p: (p.reward, p.index),
    )
    slug = partial(re.sub, r"[^A-Za-z0-9._-]+", "_")
    assert drawings == [
        folder / f"{rank:03d}_{slug(p.label).strip('_')}_{slug(p.sample_id.partition('#')[0])}.png"
        for rank, p in enumerate(worst, start=1)
    ]
    # Each file is the drawing of its own sample and output.
    for path, prediction in zip(drawings, worst, strict=True):
        sample = report.datasets[prediction.dataset][prediction.index]
        expected = draw_prediction(sample, prediction.output, prediction.reward)
        with Image.open(path) as image:
            assert image.tobytes() == expected.tobytes()


@pytest.mark.parametrize(
    "model", ["no-such-adapter", "no-such-adapter/chk_001", "{adapter}/chk_999"]
)
def test_unknown_model_is_named_and_leaves_no_adapter_behind(
    service: dict[str, Any], tmp_path: Path, model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = model.format(adapter=service["adapter_id"])
    before = adapter_ids(service["data_dir"])
    status = main_status(
        [
            *("evaluate", "--data", SYNTHETIC, "--model", "base", "--model", model),
            *("--local-dir", str(service["data_dir"]), "--out", str(tmp_path), "--no-progress"),
        ]
    )
    assert status == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and repr(model) in error
    assert not (tmp_path / "results.json").exists()
    assert adapter_ids(service["data_dir"]) == before


def main_status(arguments: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    return exit_info.value.code


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("base", ModelSpec("base", inference_model="moondream3-preview")),
        ("abc123", ModelSpec("abc123", adapter_id="abc123")),
        ("abc123/chk_001", ModelSpec("abc123/chk_001", "abc123", "abc123/chk_001")),
        ("abc123@chk_001", ModelSpec("abc123@chk_001", "abc123", "abc123/chk_001")),
    ],
)
def test_model_names_are_parsed(text: str, expected: ModelSpec) -> None:
    assert ModelSpec.parse(text) == expected
    assert expected.temporary == (text not in ("abc123", "base"))


@pytest.mark.parametrize("text", ["", "abc/", "/chk_001", "a/b/c", "a@b@c"])
def test_malformed_model_names_are_refused(text: str) -> None:
    with pytest.raises(EvaluationError, match="model"):
        ModelSpec.parse(text)
