"""Benchmarks read tiny local datasets of each shape and run through ``evaluate --benchmark``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import datasets
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from support import detect_samples, loader, quiet_trainer

from lightning_moondream.api import TuningClient
from lightning_moondream.callbacks import BenchmarkWatch
from lightning_moondream.cli import main
from lightning_moondream.data.errors import DatasetError, MissingPackageError
from lightning_moondream.data.samples import DetectSample, QuerySample
from lightning_moondream.module import MoondreamRLModule
from lightning_moondream.presets import BENCHMARKS, BenchmarkDataset, expand_names
from lightning_moondream.presets.registry import COUNT_PREFIX, DOC_SUFFIX, POPE_SUFFIX


def _images(count: int, size: tuple[int, int] = (80, 60)) -> list[Image.Image]:
    return [Image.new("RGB", size, (40 * i % 255, 90, 160)) for i in range(count)]


def _yes_no(question: str, answer: str) -> dict[str, str]:
    return {"question": question, "answer": answer}


ROWS: dict[str, dict[str, list[Any]]] = {
    "countbenchqa": {"question": ["How many cats?", "How many cups?"], "number": [3, 5]},
    "pope": {
        "adversarial": [[_yes_no("Is there a dog", "yes")], [_yes_no("Is there a cat", "no")]],
        "popular": [[_yes_no("Is there a car", "no")], []],
        "random": [[_yes_no("Is there a tree", "yes")], [_yes_no("Is there a boat", "no")]],
    },
    "chartqa": {
        "qa": [
            [
                {"question": "Peak?", "answer": "12%", "source": "human"},
                {"question": "Bars?", "answer": "4", "source": "augmented"},
            ],
            [{"question": "Max?", "answer": "[1, 2]", "source": "human"}],
        ]
    },
    "textvqa": {
        "question": ["What brand?", "What word?"],
        "answers": [["nike"] * 10, ["stop"] * 7 + ["halt"] * 3],
    },
    "docvqa": {
        "qa": [
            [{"question": "Date?", "answers": ["1 May", "May 1"]}],
            [{"question": "Total?", "answers": ["$5"]}],
        ]
    },
    "realworldqa": {
        "question": ["Which is closer? A. car B. tree", "Left or right? A. left B. right"],
        "answer": ["A", "B"],
    },
    "mmstar": {
        "question": ["Which shape? A: circle B: square", "Colour? A: red"],
        "answer": ["A"] * 2,
    },
    "tallyqa": {
        "qa": [
            [{"question": "How many dogs?", "answer": 2, "is_simple": True}],
            [{"question": "How many red cars left of the tree?", "answer": 1, "is_simple": False}],
        ]
    },
    "coco": {
        "objects": [
            json.dumps({"bbox": [[8, 6, 16, 12], [40, 30, 16, 12]], "label": [17, 18]}),
            json.dumps({"bbox": [[0, 0, 40, 30], [40, 30, 40, 30]], "label": [1, 1]}),
        ]
    },
    "refcoco": {
        "expression": [["the left cat", "cat on the left"], ["red car"]],
        "bbox": [[8, 6, 16, 12], [0, 0, 40, 30]],
    },
    "naturalbench": {
        "Question_0": ["Is the sky blue?", "Which animal? A. cat B. dog"],
        "Question_1": ["Is the grass red?", "Which colour? A. red B. green"],
        "Question_Type": ["yes_no", "multiple_choice"],
        "Image_0_Question_0": ["Yes", "A"],
        "Image_1_Question_0": ["No", "B"],
        "Image_0_Question_1": ["No", "B"],
        "Image_1_Question_1": ["Yes", "A"],
    },
}
PROMPTS = {"countbenchqa": 2, "pope": 5, "chartqa": 3, "textvqa": 2, "docvqa": 2}
PROMPTS |= {"mmstar": 2, "realworldqa": 2, "tallyqa": 2, "coco": 3, "refcoco": 3}
PROMPTS |= {"naturalbench": 8}
SECOND_IMAGE_SIZE = (40, 30)


def save_benchmark(name: str, root: Path) -> Path:
    """Save the tiny dataset of ``name``: as parquet for two of them, else save_to_disk."""
    rows = ROWS[name]
    columns = BENCHMARKS[name].images or ("image",)
    sizes = [(80, 60), SECOND_IMAGE_SIZE]
    images = {column: _images(2, size) for column, size in zip(columns, sizes, strict=False)}
    dataset = datasets.Dataset.from_dict({**images, **rows})
    for column in columns:
        dataset = dataset.cast_column(column, datasets.Image())
    target = root / name
    if name in ("countbenchqa", "coco"):
        target.mkdir(parents=True)
        dataset.to_parquet(str(target / f"{BENCHMARKS[name].split}-00000-of-00001.parquet"))
    else:
        datasets.DatasetDict({BENCHMARKS[name].split: dataset}).save_to_disk(str(target))
    return target


@pytest.fixture(scope="module")
def benchmark_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("benchmarks")
    for name in ROWS:
        save_benchmark(name, root)
    return root


@pytest.mark.parametrize("name", list(ROWS))
def test_every_benchmark_shape_expands_rows_into_prompts(name: str, benchmark_root: Path) -> None:
    dataset = BenchmarkDataset(f"{name}={benchmark_root / name}")
    assert len(dataset) == PROMPTS[name]
    samples = [dataset[i] for i in range(len(dataset))]
    kind = DetectSample if BENCHMARKS[name].skill == "detect" else QuerySample
    assert all(isinstance(sample, kind) for sample in samples)
    assert samples[0].encoded().image_size == (80, 60)


def test_prompts_answers_boxes_and_groups_follow_moondream_scripts(benchmark_root: Path) -> None:
    count = BenchmarkDataset("countbenchqa", benchmark_root / "countbenchqa")
    assert (count[1].question, count[1].answers) == (COUNT_PREFIX + "How many cups?", ("5",))
    pope = BenchmarkDataset("pope", benchmark_root / "pope")
    assert [pope.group(i) for i in range(len(pope))] == [
        "adversarial", "popular", "random", "adversarial", "random"
    ]  # fmt: skip
    assert (pope[0].question, pope[0].answers) == ("Is there a dog" + POPE_SUFFIX, ("yes",))
    chart = BenchmarkDataset("chartqa", benchmark_root / "chartqa")
    assert [chart.group(i) for i in range(3)] == ["human", "augmented", "human"]
    doc = BenchmarkDataset("docvqa", benchmark_root / "docvqa")
    assert (doc[0].question, doc[0].answers) == ("Date?" + DOC_SUFFIX, ("1 May", "May 1"))
    tally = BenchmarkDataset("tallyqa", benchmark_root / "tallyqa")
    assert [tally.group(0), tally.group(1)] == ["simple", "complex"]
    assert tally[1].answers == ("1",)
    coco = BenchmarkDataset("coco", benchmark_root / "coco")
    by_prompt = {(s.id.split("#")[0], s.object): s for s in (coco[i] for i in range(3))}
    assert set(by_prompt) == {("coco/0", "cat"), ("coco/0", "dog"), ("coco/1", "person")}
    cat = by_prompt[("coco/0", "cat")].boxes[0]
    assert (cat.x_min, cat.y_min, cat.x_max, cat.y_max) == pytest.approx((0.1, 0.1, 0.3, 0.3))
    people = by_prompt[("coco/1", "person")].boxes
    assert [v for b in people for v in (b.x_min, b.y_max)] == pytest.approx([0.0, 0.5, 0.5, 1.0])
    refer = BenchmarkDataset("refcoco", benchmark_root / "refcoco")
    assert [refer[i].object for i in range(3)] == ["the left cat", "cat on the left", "red car"]


def test_pope_prompt_puts_answer_yes_or_no_on_its_own_line(benchmark_root: Path) -> None:
    pope = BenchmarkDataset("pope", benchmark_root / "pope")
    assert pope[0].question == "Is there a dog\nAnswer yes or no."


def test_naturalbench_asks_both_questions_of_both_images(benchmark_root: Path) -> None:
    bench = BenchmarkDataset("naturalbench", benchmark_root / "naturalbench")
    first_row = [bench[i] for i in range(4)]
    assert [sample.question for sample in first_row] == [
        "Is the sky blue? Answer yes or no.",
    ] * 2 + ["Is the grass red? Answer yes or no."] * 2
    assert [s.encoded().image_size for s in first_row] == [(80, 60), SECOND_IMAGE_SIZE] * 2
    assert [bench.group(i) for i in range(4)] == ["0/0/0", "0/1/0", "0/0/1", "0/1/1"]
    # Multiple choice: the question as given.
    assert [bench[i].question for i in (4, 6)] == [
        "Which animal? A. cat B. dog", "Which colour? A. red B. green"
    ]  # fmt: skip


def test_naturalbench_reads_the_fourth_truth_from_image_0_question_1(
    benchmark_root: Path,
) -> None:
    bench = BenchmarkDataset("naturalbench", benchmark_root / "naturalbench")
    assert [bench[i].answers for i in range(4)] == [("Yes",), ("No",), ("No",), ("No",)]
    # Answering every prompt with the dataset's own truths misses the fourth prompt.
    truths = ["yes", "no", "no", "yes", "a", "b", "b", "a"]
    metric = BENCHMARKS["naturalbench"].metric()
    for index, answer in enumerate(truths):
        metric.update({"answer": answer}, bench[index].target(), bench.group(index))
    scores = {key: float(value) for key, value in metric.compute().items()}
    assert scores == pytest.approx(
        {
            "accuracy": 6 / 8,
            "question_accuracy": 2 / 4,
            "image_accuracy": 2 / 4,
            "group_accuracy": 0.0,
        }
    )


def test_naturalbench_subset_takes_whole_rows(benchmark_root: Path) -> None:
    for seed in range(4):
        bench = BenchmarkDataset(
            "naturalbench", benchmark_root / "naturalbench", limit=5, seed=seed
        )
        groups = [bench.group(i) for i in range(len(bench))]
        rows = [group.split("/")[0] for group in groups]
        assert len(groups) == 5
        assert sorted(rows.count(row) for row in set(rows)) == [1, 4], groups


def test_naturalbench_without_its_second_image_column_names_it(tmp_path: Path) -> None:
    rows = {"Image_0": _images(2), **ROWS["naturalbench"]}
    dataset = datasets.Dataset.from_dict(rows).cast_column("Image_0", datasets.Image())
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "nb"))
    with pytest.raises(DatasetError, match="benchmark naturalbench: no column 'Image_1'"):
        BenchmarkDataset("naturalbench", tmp_path / "nb")


def test_limit_takes_the_same_subset_for_a_seed(benchmark_root: Path) -> None:
    def ids(seed: int) -> list[str]:
        dataset = BenchmarkDataset("pope", benchmark_root / "pope", limit=3, seed=seed)
        return [dataset[i].question for i in range(len(dataset))]

    assert len(ids(0)) == 3
    assert ids(0) == ids(0)
    assert {tuple(ids(seed)) for seed in range(6)} != {tuple(ids(0))}


def test_all_names_every_benchmark_once() -> None:
    everything = expand_names(["pope", "all", "coco"])
    assert everything == ["pope", *(name for name in BENCHMARKS if name != "pope")]
    assert expand_names(["pope=/data/pope", "pope=/data/pope"]) == ["pope=/data/pope"]


def test_missing_benchmark_dataset_says_what_to_place_where() -> None:
    with pytest.raises(DatasetError) as error:
        BenchmarkDataset("pope", "nobody-here/pope-not-cached")
    message = str(error.value)
    assert message.startswith("benchmark pope: ")
    assert "in the local cache" in message and "pope=FOLDER" in message


def test_evaluate_benchmarks_side_by_side(
    benchmark_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "service"
    with TuningClient.local(data_dir=data_dir) as client:
        adapter_id = client.adapters.create("tuned", rank=16).adapter_id
    out = tmp_path / "out"
    arguments = ["evaluate", "--model", "base", "--model", adapter_id]
    for name in ROWS:
        arguments += ["--benchmark", f"{name}={benchmark_root / name}"]
    arguments += ["--limit", "2", "--seed", "1", "--local-dir", str(data_dir)]
    arguments += ["--out", str(out), "--no-progress", "--draw-worst", "1", "--max-side", "64"]
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["columns"][-1] == {"heading": "scores", "key": "scores"}
    rows = data["rows"]
    assert [(row["dataset"], row["model"]) for row in rows] == [
        (name, model) for name in ROWS for model in ("base", adapter_id)
    ]
    for row in rows:
        assert row["samples"] == 2
        scores = row["scores"]
        headline = BENCHMARKS[row["dataset"]].metric_names[0]
        assert 0.0 <= scores[headline] <= 1.0, row
    pope = next(row["scores"] for row in rows if row["dataset"] == "pope")
    assert {"accuracy", "f1", "precision", "recall"} <= set(pope)
    coco = next(row["scores"] for row in rows if row["dataset"] == "coco")
    assert {"moondream_map", "map", "map_50", "map_75"} <= set(coco)
    note, _, table_text = (out / "results.md").read_text().partition("\n\n")
    assert note.startswith("Scored by the local tuning service") and "not Moondream" in note
    table = table_text.splitlines()
    assert table[0].endswith("| scores |")
    assert len(table) == 2 + len(rows)
    assert "| pope | base |" in "\n".join(table) and "f1 " in "\n".join(table)
    assert "\n".join(table) in capsys.readouterr().out
    assert len(list((out / "worst").rglob("*.png"))) == len(rows)


def test_evaluate_refuses_an_unknown_benchmark_and_no_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--model", "base", "--local-dir", str(tmp_path), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--benchmark", "mmlu", *common])
    assert exit_info.value.code == 1
    assert "unknown benchmark 'mmlu'; known: countbenchqa, pope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", *common])
    assert exit_info.value.code == 1
    assert "give at least one --data or --benchmark" in capsys.readouterr().err


def test_benchmark_watch_logs_bench_metrics_during_fit(
    benchmark_root: Path, tmp_path: Path
) -> None:
    watch = BenchmarkWatch(
        [f"pope={benchmark_root / 'pope'}", f"coco={benchmark_root / 'coco'}"],
        limit=3,
        batch_size=2,
        max_side=64,
    )
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="bench/pope/f1", mode="max")
    model = MoondreamRLModule(num_rollouts=2)
    run = quiet_trainer(
        tmp_path,
        max_steps=1,
        limit_val_batches=1,
        callbacks=[watch, best],
        enable_checkpointing=True,
    )
    samples = detect_samples("train", 2)
    run.fit(model, loader(samples), loader(samples))
    logged = {key: float(value) for key, value in run.callback_metrics.items()}
    pope_keys = {"bench/pope/accuracy", "bench/pope/f1", "bench/pope/f1_adversarial"}
    assert pope_keys | {"bench/coco/moondream_map", "bench/coco/map_50"} <= set(logged)
    assert watch.scores == {key: logged[key] for key in watch.scores}
    assert 0.0 <= logged["bench/pope/accuracy"] <= 1.0
    assert best.best_model_path  # the checkpoint could monitor a bench metric


def test_benchmark_watch_stops_before_training_on_a_missing_dataset(tmp_path: Path) -> None:
    watch = BenchmarkWatch(["countbenchqa=nobody-here/countbench-not-cached"])
    run = quiet_trainer(tmp_path, max_steps=1, callbacks=[watch])
    samples = detect_samples("train", 2)
    with pytest.raises(DatasetError, match=r"benchmark countbenchqa: .*in the local cache"):
        run.fit(MoondreamRLModule(num_rollouts=2), loader(samples))


def test_a_benchmark_without_the_datasets_package_names_the_install_not_a_folder(
    benchmark_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
    with pytest.raises(MissingPackageError) as error:
        BenchmarkDataset("pope", benchmark_root / "pope")
    assert "pip install 'lightning-moondream[hf]'" in str(error.value)
    assert "=FOLDER" not in str(error.value)
