"""Hugging Face datasets load as samples: saved folders, parquet files, column mappings."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import datasets
import pytest
from PIL import Image

from lightning_moondream.cli import main
from lightning_moondream.data import MoondreamDataModule, load_dataset
from lightning_moondream.data.detect import detect_format
from lightning_moondream.data.errors import DatasetError, MissingPackageError
from lightning_moondream.data.samples import DetectSample, QuerySample

CLASSES = ["cat", "dog"]


def _image(width: int, height: int, shade: int) -> Image.Image:
    return Image.new("RGB", (width, height), (shade, 100, 200))


def _detection_dataset() -> datasets.Dataset:
    """Two images with COCO-style ``objects.bbox`` (xywh pixels) and ClassLabel names."""
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "objects": datasets.Sequence(
                {
                    "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                    "category": datasets.ClassLabel(names=CLASSES),
                }
            ),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": [_image(200, 100, 10), _image(100, 100, 90)],
            "objects": [
                {"bbox": [[20, 10, 40, 50], [100, 0, 100, 100]], "category": [0, 1]},
                {"bbox": [[50, 50, 25, 25]], "category": [1]},
            ],
        },
        features=features,
    )


def _boxes(sample: DetectSample) -> list[tuple[float, ...]]:
    return [tuple(round(v, 4) for v in (b.x_min, b.y_min, b.x_max, b.y_max)) for b in sample.boxes]


def _by_id(dataset) -> dict[str, DetectSample]:
    return {dataset[i].id: dataset[i] for i in range(len(dataset))}


EXPECTED = {
    "row 0#cat": [(0.1, 0.1, 0.3, 0.6)],
    "row 0#dog": [(0.5, 0.0, 1.0, 1.0)],
    "row 1#dog": [(0.5, 0.5, 0.75, 0.75)],
}


def _check(dataset, root: str) -> None:
    samples = _by_id(dataset)
    assert sorted(samples) == sorted(f"{root} {key}" for key in EXPECTED)
    for key, boxes in EXPECTED.items():
        sample = samples[f"{root} {key}"]
        assert sample.object == key.split("#")[1]
        assert _boxes(sample) == boxes
    encoded = samples[f"{root} row 0#cat"].encoded()
    assert encoded.image_size == (200, 100)


def test_save_to_disk_folder_loads_every_box_and_label(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    _detection_dataset().save_to_disk(str(folder))
    assert detect_format(folder) == ("huggingface", folder)
    _check(load_dataset(folder), str(folder))


def test_dataset_dict_picks_the_named_split_and_train_by_default(tmp_path: Path) -> None:
    folder = tmp_path / "dict"
    train = _detection_dataset().select([1])
    datasets.DatasetDict({"train": train, "validation": _detection_dataset()}).save_to_disk(
        str(folder)
    )
    assert len(load_dataset(folder)) == 1
    assert len(load_dataset(folder, split="train")) == 1
    assert len(load_dataset(folder, split="val")) == 3
    with pytest.raises(DatasetError, match="no split 'test'; available: train, validation"):
        load_dataset(folder, split="test")


def _three_splits() -> datasets.DatasetDict:
    """Train: 9 samples (three copies of the two rows); validation: 3; test: 1."""
    rows = _detection_dataset()
    return datasets.DatasetDict(
        {
            "train": datasets.concatenate_datasets([rows, rows, rows]),
            "validation": rows,
            "test": rows.select([1]),
        }
    )


def _saved_dataset_dict(root: Path) -> Path:
    """The three splits saved with ``DatasetDict.save_to_disk``; the folder."""
    folder = root / "dict"
    _three_splits().save_to_disk(str(folder))
    return folder


def _parquet_by_split(root: Path) -> Path:
    """The three splits as Hub-style ``data/<split>-00000-of-00001.parquet`` files; the root."""
    (root / "data").mkdir()
    for split, rows in _three_splits().items():
        rows.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(_saved_dataset_dict, id="saved-dataset-dict"),
        pytest.param(_parquet_by_split, id="parquet-files-by-split"),
    ],
)
def test_each_stage_gets_its_split(tmp_path: Path, write: Callable[[Path], Path]) -> None:
    folder = write(tmp_path)
    module = MoondreamDataModule(train=str(folder), val=str(folder), test=str(folder))
    module.setup("fit")
    module.setup("test")
    sizes = {stage: len(module.datasets[stage]) for stage in ("train", "val", "test")}
    assert sizes == {"train": 9, "val": 3, "test": 1}
    # load_dataset without a split reads the training split, as its docstring says.
    assert len(load_dataset(folder)) == 9


def test_parquet_files_by_split_with_xyxy_normalized_string_labels(tmp_path: Path) -> None:
    rows = datasets.Dataset.from_dict(
        {
            "image": [_image(200, 100, 10), _image(100, 100, 90)],
            "boxes": [[[0.1, 0.1, 0.3, 0.6], [0.5, 0.0, 1.0, 1.0]], [[0.5, 0.5, 0.75, 0.75]]],
            "names": [["cat", "dog"], ["dog"]],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "boxes": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                "names": datasets.Sequence(datasets.Value("string")),
            }
        ),
    )
    (tmp_path / "data").mkdir()
    rows.to_parquet(str(tmp_path / "data" / "validation-00000-of-00001.parquet"))
    rows.select([1]).to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    columns = {"boxes": "boxes", "labels": "names", "normalized": True}
    _check(load_dataset(tmp_path, split="val", columns=columns), str(tmp_path))
    assert len(load_dataset(tmp_path, columns=columns)) == 1
    single = tmp_path / "data" / "train-00000-of-00001.parquet"
    assert len(load_dataset(single, columns={"labels": "names", "normalized": True})) == 1


def test_integer_labels_need_class_names(tmp_path: Path) -> None:
    rows = datasets.Dataset.from_dict(
        {"image": [_image(100, 100, 0)], "bbox": [[[10, 10, 20, 20]]], "label": [[3]]}
    )
    rows.to_parquet(str(tmp_path / "rows.parquet"))
    with pytest.raises(DatasetError, match=r"row 0 box 0: label 3 is a number without class"):
        load_dataset(tmp_path / "rows.parquet")
    dataset = load_dataset(tmp_path / "rows.parquet", class_names=["a", "b", "c", "truck"])
    assert dataset[0].object == "truck"
    assert _boxes(dataset[0]) == [(0.1, 0.1, 0.3, 0.3)]


def test_query_rows_become_questions_with_their_answers(tmp_path: Path) -> None:
    rows = datasets.Dataset.from_dict(
        {
            "image": [_image(64, 48, 5), _image(32, 32, 9)],
            "question": ["How many cats?", "What colour?"],
            "answers": [["2", "two"], ["blue"]],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answers": datasets.Sequence(datasets.Value("string")),
            }
        ),
    )
    rows.save_to_disk(str(tmp_path / "qa"))
    dataset = load_dataset(tmp_path / "qa", skill="query")
    first = dataset[0]
    assert isinstance(first, QuerySample)
    assert (first.question, first.answers) == ("How many cats?", ("2", "two"))
    assert dataset[1].answers == ("blue",)
    assert first.encoded().image_size == (64, 48)


def test_missing_hub_dataset_says_what_to_place_where() -> None:
    with pytest.raises(DatasetError) as error:
        load_dataset("nobody-here/not-a-cached-dataset", format="huggingface")
    message = str(error.value)
    assert "'nobody-here/not-a-cached-dataset'" in message
    assert "in the local cache" in message and "save_to_disk" in message


def test_missing_boxes_column_is_named(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"image": [_image(8, 8, 0)], "caption": ["x"]}).save_to_disk(
        str(tmp_path / "c")
    )
    with pytest.raises(DatasetError, match="no boxes column found"):
        load_dataset(tmp_path / "c")


def test_named_in_a_data_module_mapping_and_in_evaluate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "ds"
    datasets.DatasetDict({"validation": _detection_dataset()}).save_to_disk(str(folder))
    spec = {"source": str(folder), "split": "validation", "columns": {"boxes": "objects.bbox"}}
    data = MoondreamDataModule(train=spec, val=spec, batch_size=2, num_workers=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert len(batch) == 2 and all(isinstance(sample, DetectSample) for sample in batch)
    assert all(sample.image_size is not None for sample in batch)

    out = tmp_path / "out"
    arguments = ["evaluate", "--data", str(folder), "--model", "base", "--no-progress"]
    arguments += ["--local-dir", str(tmp_path / "service"), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(row["dataset"], row["samples"]) for row in rows] == [("ds (validation)", 3)]


def test_hub_name_is_read_from_the_local_cache_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cache laid out as `datasets` leaves it after a download of "someone/tiny-qa".
    rows = datasets.Dataset.from_dict(
        {"image": [_image(40, 20, 7)], "question": ["How many?"], "answers": [["4"]]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answers": datasets.Sequence(datasets.Value("string")),
            }
        ),
    )
    rows.to_parquet(str(tmp_path / "rows.parquet"))
    built = tmp_path / "built"
    datasets.load_dataset(
        "parquet", data_files={"test": str(tmp_path / "rows.parquet")}, cache_dir=str(built)
    )
    (info,) = built.glob("parquet/*/0.0.0/*/dataset_info.json")
    cache = tmp_path / "cache"
    target = cache / "someone___tiny-qa" / "default" / "0.0.0" / "0123abcd"
    target.mkdir(parents=True)
    (target / "dataset_info.json").write_bytes(info.read_bytes())
    (target / "tiny-qa-test.arrow").write_bytes((info.parent / "parquet-test.arrow").read_bytes())
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)

    assert detect_format("someone/tiny-qa") == ("huggingface", Path("someone/tiny-qa"))
    dataset = load_dataset("someone/tiny-qa", skill="query")
    assert (dataset[0].question, dataset[0].answers) == ("How many?", ("4",))
    assert dataset[0].encoded().image_size == (40, 20)


def test_without_the_datasets_package_the_error_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "dict"
    _three_splits().save_to_disk(str(folder))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
    install = "pip install 'lightning-moondream[hf]'"
    for source in (folder, "someone/tiny-qa"):
        with pytest.raises(
            MissingPackageError, match="'datasets' package is not installed"
        ) as error:
            load_dataset(source, format="huggingface")
        assert install in str(error.value)
