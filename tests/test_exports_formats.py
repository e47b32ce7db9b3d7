"""Exports of labelling tools load as they come: every box in place, with its label."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from builders import voc_devkit
from exports import (
    coco_2017,
    cvat_export,
    jsonl_folder,
    label_studio_export,
    label_studio_folder,
    labelme_folder,
    roboflow_coco,
    roboflow_coco_folder,
    roboflow_yolo,
    split_root,
    voc_folder,
    voc_split_folders,
)

from lightning_moondream.api.models import Box, Point
from lightning_moondream.data import (
    DatasetError,
    DatasetWarning,
    MoondreamDataModule,
    PointSample,
    detect_format,
    load_dataset,
)
from lightning_moondream.data.detect import dataset_splits
from lightning_moondream.data.sources.cvat import read_cvat
from lightning_moondream.data.sources.labelme import read_labelme
from lightning_moondream.data.sources.labelstudio import read_label_studio


def boxes_by_prompt(dataset) -> dict[str, list[tuple[float, ...]]]:
    """Every sample's boxes as rounded tuples, by sample id (``image#class``)."""
    result = {}
    for index in range(len(dataset)):
        sample = dataset[index]
        result[sample.id] = [
            tuple(round(value, 6) for value in (box.x_min, box.y_min, box.x_max, box.y_max))
            for box in sample.boxes
        ]
    return result


def test_roboflow_yolo_splits_resolve_as_ultralytics_does(tmp_path: Path) -> None:
    root = roboflow_yolo(tmp_path / "pets")
    assert detect_format(root) == ("yolo", root)
    assert dataset_splits(root) == ["train", "val", "test"]
    assert boxes_by_prompt(load_dataset(root)) == {
        "t1.jpg#cat": [(0.4, 0.3, 0.6, 0.7)],
        "t1.jpg#dog": [(0.2, 0.2, 0.3, 0.3)],
    }
    # The split data.yaml calls val, on disk valid/, by either name; its polygon is boxed.
    expected_val = {"v1.jpg#dog": [(0.1, 0.2, 0.3, 0.4)]}
    assert boxes_by_prompt(load_dataset(root, split="val")) == expected_val
    assert boxes_by_prompt(load_dataset(root, split="valid")) == expected_val
    assert boxes_by_prompt(load_dataset(root / "data.yaml", split="validation")) == expected_val
    # test/ is on disk but not in data.yaml.
    assert boxes_by_prompt(load_dataset(root, split="test")) == {"s1.jpg#cat": [(0, 0, 1, 1)]}
    with pytest.raises(
        DatasetError, match=r"data\.yaml: no split 'holdout'; available: train, val, test"
    ):
        load_dataset(root, split="holdout")


def test_yolo_entry_that_does_not_exist_is_named(tmp_path: Path) -> None:
    root = roboflow_yolo(tmp_path / "pets")
    (root / "data.yaml").write_text(
        "train: ../train/images\nval: ../missing/images\nnames: [cat, dog]\n"
    )
    with pytest.raises(
        DatasetError, match=r"data\.yaml split 'val': .*missing/images does not exist"
    ):
        load_dataset(root, split="val")


def test_roboflow_coco_split_folders(tmp_path: Path) -> None:
    root = roboflow_coco(tmp_path / "coco")
    assert detect_format(root) == ("coco", root)
    assert dataset_splits(root) == ["train", "valid"]
    assert boxes_by_prompt(load_dataset(root)) == {
        "a_jpg.rf.1.jpg#cat": [(0.1, 0.1, 0.3, 0.3)],
        "a_jpg.rf.1.jpg#dog": [(0, 0, 1, 1)],
    }
    expected = {"b_jpg.rf.2.jpg#dog": [(0.5, 0.5, 0.75, 0.9)]}
    assert boxes_by_prompt(load_dataset(root, split="val")) == expected
    assert boxes_by_prompt(load_dataset(root, split="valid", format="coco")) == expected
    # The split folder itself loads too.
    assert boxes_by_prompt(load_dataset(root / "valid")) == expected


def test_coco_instances_per_split_layout(tmp_path: Path) -> None:
    root = coco_2017(tmp_path / "coco2017")
    assert dataset_splits(root) == ["train2017", "val2017"]
    expected = {"000000000139.jpg#cat": [(0.3, 0.2, 0.7, 0.6)]}
    assert boxes_by_prompt(load_dataset(root, split="val")) == expected
    assert boxes_by_prompt(load_dataset(root, split="val2017")) == expected
    assert list(boxes_by_prompt(load_dataset(root))) == ["000000000009.jpg#cat"]


def test_voc_per_split_folders(tmp_path: Path) -> None:
    root = voc_split_folders(tmp_path / "voc")
    assert detect_format(root)[0] == "voc"
    assert boxes_by_prompt(load_dataset(root)) == {"train_img.jpg#cat": [(0.1, 0.1, 0.3, 0.3)]}
    assert boxes_by_prompt(load_dataset(root, split="val")) == {
        "valid_img.jpg#dog": [(0, 0, 0.5, 1)]
    }


def test_cvat_boxes_polygons_points_and_occlusion(tmp_path: Path) -> None:
    root = cvat_export(tmp_path / "cvat")
    assert detect_format(root) == ("cvat", root / "annotations.xml")
    images, classes = read_cvat(root / "annotations.xml", root / "images")
    assert classes == ["cat", "dog", "nose"]
    one, two = images
    assert (one.id, two.id, two.boxes) == ("one.jpg", "two.jpg", ())
    assert one.labels == ("cat", "dog", "dog", "cat")
    assert [box.model_dump() for box in one.boxes] == [
        pytest.approx(Box(x_min=0.1, y_min=0.1, x_max=0.3, y_max=0.5).model_dump()),
        # A 20x10 box turned 90 degrees about its centre (50, 25).
        pytest.approx(Box(x_min=0.45, y_min=0.3, x_max=0.55, y_max=0.7).model_dump()),
        pytest.approx(Box(x_min=0.7, y_min=0.1, x_max=0.9, y_max=0.8).model_dump()),
        pytest.approx(Box(x_min=0.01, y_min=0.04, x_max=0.11, y_max=0.44).model_dump()),
    ]
    assert one.occluded == (True, False, False, False)
    assert one.points == (Point(x=0.205, y=0.24),) and one.point_labels == ("nose",)
    # Found without naming the image folder: images/ beside the XML.
    points = {sample.id: sample for sample in load_dataset(root, skill="point")}
    assert isinstance(points["one.jpg#nose"], PointSample)
    assert points["one.jpg#nose"].points == (Point(x=0.205, y=0.24),)
    assert len(points["one.jpg#cat"].boxes) == 2


def test_cvat_errors_name_file_image_and_shape(tmp_path: Path) -> None:
    root = cvat_export(tmp_path / "cvat")
    xml = root / "annotations.xml"
    xml.write_text(xml.read_text().replace('<polygon label="dog"', '<polygon label="horse"'))
    with pytest.raises(
        DatasetError,
        match=r"annotations\.xml image 'photos/one\.jpg' <polygon> 2 \(horse\): label 'horse' "
        r"is not among the labels of <meta>: cat, dog, nose",
    ):
        load_dataset(root)


def test_label_studio_percent_rotation_keypoints_and_exif(tmp_path: Path) -> None:
    export, pictures = label_studio_export(tmp_path / "ls")
    assert detect_format(export.parent) == ("labelstudio", export)
    images, classes = read_label_studio(export, pictures)
    assert classes == ["cat", "dog", "nose"]
    cat, tall = images
    assert (cat.image, cat.size) == (str(pictures / "cat.jpg"), (100, 50))
    assert [tuple(round(v, 6) for v in box.model_dump().values()) for box in cat.boxes] == [
        (0.1, 0.2, 0.4, 0.6),
        # 20x10 pixels at (50, 5), turned 90 degrees clockwise about that corner.
        (0.4, 0.1, 0.5, 0.5),
    ]
    assert cat.labels == ("cat", "dog")
    assert cat.points == (Point(x=0.25, y=0.5),) and cat.point_labels == ("nose",)
    # Stored 80x40, displayed 40x80 (EXIF): annotated, and sent, in the displayed frame.
    assert tall.size == (40, 80) and tall.labels == ("cat",)
    assert tall.boxes == (Box(x_min=0.25, y_min=0.5, x_max=0.75, y_max=0.75),)
    samples = load_dataset(export, image_root=str(pictures))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)
        encoded = [samples[index].encoded() for index in range(len(samples))]
    assert {sample.id: sample.image_size for sample in encoded}["tall.jpg#cat"] == (40, 80)


def test_label_studio_bad_regions_are_named(tmp_path: Path) -> None:
    export, pictures = label_studio_export(tmp_path / "ls")
    text = export.read_text()
    export.write_text(text.replace('"width": 30', '"width": "30"'))
    with pytest.raises(
        DatasetError, match=r"task 11 result 0 \(id r1\) \(cat\): value\.width must be a number"
    ):
        load_dataset(export, image_root=str(pictures))
    export.write_text(text.replace('"x": 10', '"x": 90'))
    with pytest.warns(DatasetWarning, match=r"task 11 result 0 \(id r1\) \(cat\).*clamped"):
        images, _ = read_label_studio(export, pictures)
    assert images[0].boxes[0] == Box(x_min=0.9, y_min=0.2, x_max=1.0, y_max=0.6)
    with pytest.raises(DatasetError, match="extends outside the 100x50 image"):
        read_label_studio(export, pictures, strict=True)
    with pytest.raises(
        DatasetError, match=r"task 11: image '/data/upload/1/3f2a9c1e-cat\.jpg' not found"
    ):
        read_label_studio(export, tmp_path / "ls" / "export", strict=True)


def test_labelme_shapes_and_embedded_image(tmp_path: Path) -> None:
    root = labelme_folder(tmp_path / "labelme")
    assert detect_format(root) == ("labelme", root)
    (a, b), classes = read_labelme(root)
    assert classes == ["cat", "dog", "nose"]
    assert a.image == str(root / "json" / ".." / "images" / "a.jpg")
    assert a.boxes == (
        Box(x_min=0.1, y_min=0.1, x_max=0.3, y_max=0.5),
        Box(x_min=0.6, y_min=0.2, x_max=0.9, y_max=0.9),
    )
    assert a.labels == ("cat", "dog") and a.points == (Point(x=0.5, y=0.5),)
    assert (
        isinstance(b.image, bytes)
        and b.id == "b.png"
        and b.boxes == (Box(x_min=0, y_min=0, x_max=1, y_max=1),)
    )
    detect = boxes_by_prompt(load_dataset(root))
    assert "a.jpg#nose" not in detect and detect["a.jpg#cat"] == [(0.1, 0.1, 0.3, 0.5)]
    point = {sample.id: sample for sample in load_dataset(root, skill="point")}
    assert point["a.jpg#nose"].points == (Point(x=0.5, y=0.5),)
    query = {sample.id: sample.answers for sample in load_dataset(root, skill="query")}
    assert query["a.jpg#count:nose"][0] == "1" and query["a.jpg#presence:nose"] == ("yes",)
    assert query["a.jpg#count:dog"][0] == "1" and query["b.png#count:dog"][0] == "1"


def test_labelme_rectangle_needs_two_corners(tmp_path: Path) -> None:
    root = labelme_folder(tmp_path / "labelme")
    path = root / "json" / "a.json"
    entry = json.loads(path.read_text())
    entry["shapes"][0]["points"].append([1, 1])
    path.write_text(json.dumps(entry))
    with pytest.raises(
        DatasetError,
        match=r"a\.json shapes\[0\] \(cat, rectangle\): expected 2 corner points, got 3",
    ):
        load_dataset(root)


def test_forced_format_that_does_not_match_says_what_was_expected(tmp_path: Path) -> None:
    root = labelme_folder(tmp_path / "labelme")
    with pytest.raises(
        DatasetError, match=r"not a cvat dataset; expected a CVAT for images 1\.1 XML"
    ):
        load_dataset(root, format="cvat")


@pytest.mark.parametrize(
    ("build", "train_ids", "val_ids"),
    [
        (roboflow_yolo, {"t1.jpg#cat", "t1.jpg#dog"}, {"v1.jpg#dog"}),
        (roboflow_coco, {"a_jpg.rf.1.jpg#cat", "a_jpg.rf.1.jpg#dog"}, {"b_jpg.rf.2.jpg#dog"}),
        (voc_split_folders, {"train_img.jpg#cat"}, {"valid_img.jpg#dog"}),
        (cvat_export, {"one.jpg#cat", "one.jpg#dog"}, {"one.jpg#cat", "one.jpg#dog"}),
        (labelme_folder, {"a.jpg#cat", "a.jpg#dog", "b.png#dog"}, None),
    ],
)
def test_each_stage_of_the_data_module_takes_its_split(
    build, train_ids: set[str], val_ids: set[str] | None, tmp_path: Path
) -> None:
    root = str(build(tmp_path / "export"))
    module = MoondreamDataModule(train=root, val=root, batch_size=8, shuffle=False)
    module.setup("fit")
    (train_batch,) = list(module.train_dataloader())
    (val_batch,) = list(module.val_dataloader())
    assert {sample.id for sample in train_batch} == train_ids
    assert all(sample.image.startswith("data:image/jpeg;base64,") for sample in train_batch)
    expected_val = val_ids if val_ids is not None else {sample.id for sample in train_batch}
    assert {sample.id for sample in val_batch} == expected_val


def split_folders_read(dataset, root: Path) -> set[str]:
    """The split folders of ``root`` that a dataset's images come from."""
    images = (dataset[index].image for index in range(len(dataset)))
    return {Path(image).relative_to(root).parts[0] for image in images if isinstance(image, str)}


@pytest.mark.parametrize(
    "build",
    [
        lambda root: roboflow_yolo(root),
        lambda root: split_root(
            root,
            lambda folder: roboflow_coco_folder(folder, [(0, "a.jpg")], [(0, 0, 1, [1, 1, 9, 9])]),
        ),
        lambda root: split_root(root, lambda folder: voc_folder(folder, [("cat", (1, 1, 9, 9))])),
        lambda root: split_root(root, cvat_export),
        lambda root: split_root(root, label_studio_folder),
        lambda root: split_root(root, labelme_folder),
        lambda root: split_root(root, jsonl_folder),
    ],
    ids=["yolo", "coco", "voc", "cvat", "labelstudio", "labelme", "jsonl"],
)
def test_a_split_root_named_for_every_stage_gives_each_its_split(build, tmp_path: Path) -> None:
    root = build(tmp_path / "export")
    module = MoondreamDataModule(train=str(root), val=str(root), test=str(root))
    module.setup("fit")
    module.setup("test")
    assert split_folders_read(module.datasets["train"], root) == {"train"}
    assert split_folders_read(module.datasets["val"], root) == {"valid"}
    assert split_folders_read(module.datasets["test"], root) == {"test"}
    assert split_folders_read(load_dataset(root), root) == {"train"}


def test_split_files_give_each_stage_its_split(tmp_path: Path) -> None:
    coco = str(coco_2017(tmp_path / "coco"))
    devkit = {"source": str(voc_devkit(tmp_path / "devkit")), "negative_rate": 1.0}
    module = MoondreamDataModule(train=[{"source": coco}, devkit], val=[{"source": coco}, devkit])
    module.setup("fit")
    ids = {stage: set(boxes_by_prompt(module.datasets[stage])) for stage in ("train", "val")}
    assert ids == {
        "train": {"000000000009.jpg#cat", "a.jpg#cell", "a.jpg#virus", "b.jpg#cell", "b.jpg#virus"},
        "val": {"000000000139.jpg#cat", "c.jpg#cell", "c.jpg#virus"},
    }


def test_label_studio_in_the_data_module_with_its_image_folder(tmp_path: Path) -> None:
    export, pictures = label_studio_export(tmp_path / "ls")
    spec = {"source": str(export), "image_root": str(pictures)}
    module = MoondreamDataModule(train=spec, val=spec, batch_size=8, shuffle=False)
    module.setup("fit")
    (batch,) = list(module.val_dataloader())
    assert {sample.id for sample in batch} == {"cat.jpg#cat", "cat.jpg#dog", "tall.jpg#cat"}
    assert {sample.id: sample.image_size for sample in batch}["tall.jpg#cat"] == (40, 80)


def test_yolo_lists_of_entries_and_a_path_from_another_machine(tmp_path: Path) -> None:
    root = roboflow_yolo(tmp_path / "pets")
    (root / "train.txt").write_text("./train/images/t1.jpg\n\n")
    (root / "data.yaml").write_text(
        "path: /datasets/on/another/machine\ntrain: [train.txt, ../test/images]\n"
        "val: ../valid/images\nnames: {0: cat, 1: dog}\n"
    )
    assert boxes_by_prompt(load_dataset(root / "data.yaml", split="train")) == {
        "t1.jpg#cat": [(0.4, 0.3, 0.6, 0.7)],
        "t1.jpg#dog": [(0.2, 0.2, 0.3, 0.3)],
        "s1.jpg#cat": [(0, 0, 1, 1)],
    }
