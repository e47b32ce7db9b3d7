"""Which classes become prompts: placeholders dropped, rare ones reported, safe negatives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from exports import CHESS_PIECES, roboflow_chess

from lightning_moondream.data import DatasetWarning, MoondreamDataModule, load_dataset
from lightning_moondream.data.classes import label_phrase, may_be_absent


def prompts(dataset) -> dict[str, int]:
    """Each sample's id with its number of true boxes."""
    return {sample.id: len(sample.boxes) for sample in (dataset[i] for i in range(len(dataset)))}


def test_roboflow_placeholder_and_stray_class_make_no_false_negatives(tmp_path: Path) -> None:
    folder = roboflow_chess(tmp_path / "chess" / "train")
    with pytest.warns(DatasetWarning) as caught:
        samples = prompts(load_dataset(folder, negative_rate=1.0))
    messages = [str(warning.message) for warning in caught]
    assert any("classes without annotations are not prompted: pieces" in m for m in messages)
    assert any(
        "classes with few annotations (under 5, or under 1% of all 26): bishop (1)" in m
        for m in messages
    )
    assert not [name for name in samples if name.endswith("#pieces")]
    # "bishop" is never asked as absent where a black or white bishop is.
    assert [name for name in samples if name.endswith("#bishop")] == ["b6.jpg#bishop"]
    negatives = {name for name, boxes in samples.items() if boxes == 0}
    assert negatives == {f"b6.jpg#{piece}" for piece in CHESS_PIECES if piece != "black-king"}
    assert len(samples) == 6 * 4 + 2 + len(negatives)


def test_a_supercategory_with_boxes_is_prompted_but_never_absent(tmp_path: Path) -> None:
    folder = roboflow_chess(tmp_path / "chess")
    path = folder / "_annotations.coco.json"
    data = json.loads(path.read_text())
    data["annotations"].append(
        {"id": 99, "image_id": 6, "category_id": 0, "bbox": [50, 5, 10, 10], "area": 100}
    )
    path.write_text(json.dumps(data))
    with pytest.warns(DatasetWarning, match="few annotations"):
        samples = prompts(load_dataset(folder, negative_rate=1.0))
    assert [name for name in samples if name.endswith("#pieces")] == ["b6.jpg#pieces"]
    assert samples["b6.jpg#pieces"] == 1


def test_phrase_labels_turn_class_names_into_phrases(tmp_path: Path) -> None:
    folder = roboflow_chess(tmp_path / "chess")
    with pytest.warns(DatasetWarning):
        detect = load_dataset(folder, phrase_labels=True)
        query = load_dataset(folder, skill="query", questions=["count"], phrase_labels=True)
        plain = load_dataset(folder)
    by_id = {sample.id: sample for sample in (detect[i] for i in range(len(detect)))}
    assert by_id["b0.jpg#black-king"].object == "black king"
    assert query[0].question == "How many black bishop are there?"
    assert {plain[i].object for i in range(len(plain))} == {"bishop", *CHESS_PIECES}


def test_phrase_labels_of_the_data_module_and_of_a_source_mapping(tmp_path: Path) -> None:
    folder = str(roboflow_chess(tmp_path / "chess"))
    module = MoondreamDataModule(
        train=folder, val={"source": folder, "phrase_labels": False}, phrase_labels=True
    )
    with pytest.warns(DatasetWarning):
        module.setup("fit")
    train, val = (module.datasets[stage] for stage in ("train", "val"))
    assert {train[i].object for i in range(len(train))} == {
        "bishop",
        *(piece.replace("-", " ") for piece in CHESS_PIECES),
    }
    assert {val[i].object for i in range(len(val))} == {"bishop", *CHESS_PIECES}


@pytest.mark.parametrize(
    ("name", "phrase"),
    [("black-king", "black king"), ("traffic_light", "traffic light"), ("Stop  sign", "Stop sign")],
)
def test_label_phrase(name: str, phrase: str) -> None:
    assert label_phrase(name) == phrase


@pytest.mark.parametrize(
    ("name", "present", "allowed"),
    [
        ("bishop", {"black-bishop"}, False),
        ("light", {"traffic_light"}, False),
        ("traffic light", {"traffic_light"}, False),
        ("Black Bishop", {"black-bishop"}, False),
        ("car", {"carrot"}, True),
        ("black-bishop", {"bishop"}, True),
        ("king bishop", {"black-bishop"}, True),
        ("pieces", {"black-king"}, True),
    ],
)
def test_a_negative_is_never_part_of_a_present_class_name(
    name: str, present: set[str], allowed: bool
) -> None:
    assert may_be_absent(name, present) is allowed


def test_a_group_is_never_absent() -> None:
    assert may_be_absent("pieces", {"black-king"}, groups={"pieces"}) is False
