import json

import pytest
from builders import (
    coco_tree,
    exif_rotated_jpeg,
    save_image,
    voc_devkit,
    voc_xml,
    yolo_tree,
)

from lightning_moondream.api.models import Box, Point
from lightning_moondream.data import (
    DatasetError,
    DatasetWarning,
    DetectSample,
    PointSample,
    QuerySample,
    detect_format,
    load_dataset,
)


def by_id(dataset):
    return {dataset[i].id: dataset[i] for i in range(len(dataset))}


def test_coco_detect_samples_and_exact_boxes(tmp_path):
    annotation = coco_tree(tmp_path)
    assert detect_format(tmp_path) == ("coco", annotation)
    samples = by_id(load_dataset(tmp_path))
    # image 1: cat, dog; image 2: dog (crowd skipped); image 3: nothing.
    assert sorted(samples) == ["1.jpg#cat", "1.jpg#dog", "2.jpg#dog"]
    cat = samples["1.jpg#cat"]
    assert isinstance(cat, DetectSample) and cat.image.endswith("images/1.jpg")
    assert cat.boxes == (
        Box(x_min=0.1, y_min=0.1, x_max=0.3, y_max=0.3),
        Box(x_min=0.5, y_min=0.4, x_max=0.8, y_max=0.8),
    )
    assert samples["2.jpg#dog"].boxes == (Box(x_min=0.25, y_min=0.0, x_max=0.75, y_max=0.5),)
    crowd = by_id(load_dataset(annotation, include_crowd=True))
    assert len(crowd["2.jpg#dog"].boxes) == 2


def test_negatives_are_seeded_and_empty(tmp_path):
    coco_tree(tmp_path)
    everything = load_dataset(tmp_path, negative_rate=1.0)
    assert len(everything) == 6  # 3 images x 2 classes
    negatives = [s for s in (everything[i] for i in range(6)) if not s.boxes]
    assert {s.id for s in negatives} == {"2.jpg#cat", "3.jpg#cat", "3.jpg#dog"}
    first = [s.id for s in load_dataset(tmp_path, negative_rate=0.5, seed=3)]
    again = [s.id for s in load_dataset(tmp_path, negative_rate=0.5, seed=3)]
    assert first == again


def test_coco_point_and_query_skills(tmp_path):
    coco_tree(tmp_path)
    points = by_id(load_dataset(tmp_path, skill="point", template="the {name}"))
    assert isinstance(points["1.jpg#cat"], PointSample)
    assert points["1.jpg#cat"].object == "the cat" and len(points["1.jpg#cat"].boxes) == 2
    questions = by_id(load_dataset(tmp_path, skill="query", negative_rate=1.0))
    count = questions["1.jpg#count:cat"]
    assert isinstance(count, QuerySample)
    assert count.question == "How many cat are there?" and count.answers == ("2", "two")
    assert questions["3.jpg#presence:dog"].answers == ("no",)
    assert questions["2.jpg#presence:dog"].answers == ("yes",)


def test_coco_keypoints_visible_only(tmp_path):
    annotation = coco_tree(tmp_path)
    samples = by_id(load_dataset(annotation, skill="point", keypoints=True))
    assert sorted(samples) == ["1.jpg#left eye", "1.jpg#right eye"]
    assert samples["1.jpg#left eye"].points == (Point(x=0.15, y=0.16), Point(x=0.55, y=0.5))
    assert samples["1.jpg#right eye"].points == (Point(x=0.6, y=0.5),)


def test_coco_errors_name_file_and_annotation(tmp_path):
    annotation = coco_tree(tmp_path)
    data = json.loads(annotation.read_text())
    data["annotations"][1]["category_id"] = 99
    annotation.write_text(json.dumps(data))
    with pytest.raises(
        DatasetError, match=r"instances\.json annotations\[1\] \(id 11\): category id 99"
    ):
        load_dataset(annotation)
    annotation.write_text("{not json")
    with pytest.raises(DatasetError, match=r"instances\.json: malformed JSON at line 1"):
        load_dataset(annotation)
    with pytest.raises(DatasetError, match=r"nowhere: no such file"):
        load_dataset(tmp_path / "nowhere")


def test_voc_devkit_splits(tmp_path):
    root = voc_devkit(tmp_path / "devkit")
    train = by_id(load_dataset(root))
    assert sorted(train) == ["a.jpg#cell", "a.jpg#virus", "b.jpg#virus"]
    assert train["a.jpg#cell"].boxes[0] == Box(
        x_min=10 / 64, y_min=10 / 48, x_max=30 / 64, y_max=20 / 48
    )
    assert train["b.jpg#virus"].boxes == (Box(x_min=0, y_min=0, x_max=1, y_max=1),)
    assert len(load_dataset(root, split="val", negative_rate=1.0)) == 2
    with pytest.raises(DatasetError, match=r"devkit: no split 'test'; available: train, val"):
        load_dataset(root, split="test")


def test_voc_flat_with_separate_folders_and_bad_annotations(tmp_path):
    save_image(tmp_path / "images" / "one.jpg", (100, 100))
    voc_xml(
        tmp_path / "annotations" / "one.xml", "one.jpg", (100, 100), [("fox", (10, 10, 120, 50))]
    )
    save_image(tmp_path / "images" / "two.png", (50, 50))
    voc_xml(
        tmp_path / "annotations" / "two.xml", "renamed.jpg", (60, 50), [("fox", (0, 0, 25, 25))]
    )
    assert detect_format(tmp_path)[0] == "voc"
    with pytest.warns(DatasetWarning) as caught:
        samples = by_id(load_dataset(tmp_path, format="voc"))
    messages = [str(w.message) for w in caught]
    assert any("one.xml object 0 (fox)" in m and "clamped" in m for m in messages)
    assert any("two.xml: <size> says 60x50 but two.png is 50x50" in m for m in messages)
    assert samples["one.jpg#fox"].boxes == (Box(x_min=0.1, y_min=0.1, x_max=1.0, y_max=0.5),)
    assert samples["two.png#fox"].boxes == (Box(x_min=0, y_min=0, x_max=0.5, y_max=0.5),)
    (tmp_path / "annotations" / "three.xml").write_text("<annotation><object></object>")
    with pytest.raises(DatasetError, match=r"three\.xml: malformed XML"):
        load_dataset(tmp_path)


def test_yolo_splits_polygons_and_class_errors(tmp_path):
    root = yolo_tree(tmp_path)
    train = by_id(load_dataset(root))
    assert sorted(train) == ["x.jpg#apple", "x.jpg#plum"]
    assert train["x.jpg#apple"].boxes == (Box(x_min=0.4, y_min=0.3, x_max=0.6, y_max=0.7),)
    val = by_id(load_dataset(root / "data.yaml", split="val"))
    assert val["z.jpg#pear"].boxes == (Box(x_min=0.1, y_min=0.2, x_max=0.3, y_max=0.4),)
    (root / "labels" / "train" / "x.txt").write_text("0 0.5 0.5 0.2 0.4\n7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(
        DatasetError, match=r"labels/train/x\.txt line 2: class id 7 not in 3 classes"
    ):
        load_dataset(root)
    (root / "labels" / "train" / "x.txt").write_text("0 0.5 0.5\n")
    with pytest.raises(DatasetError, match=r"x\.txt line 1: expected 4 box values"):
        load_dataset(root)


def test_yolo_classes_txt_flat_layout(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\n")
    save_image(tmp_path / "images" / "i.jpg")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "i.txt").write_text("1 0.5 0.5 1.2 0.5\n")
    with pytest.warns(DatasetWarning, match=r"i\.txt line 1.*clamped"):
        samples = load_dataset(tmp_path, format="yolo")
    assert samples[0].boxes == (Box(x_min=0.0, y_min=0.25, x_max=1.0, y_max=0.75),)
    with pytest.raises(DatasetError, match=r"no split folders"):
        load_dataset(tmp_path, split="val")


def test_jsonl_manifest_all_skills(tmp_path):
    exif_rotated_jpeg(tmp_path / "r.jpg", (80, 40), 6)  # displayed 40x80
    lines = [
        {"image": "r.jpg", "skill": "detect", "object": "dog", "boxes": [[10, 20, 30, 60]]},
        {
            "image": "r.jpg",
            "skill": "detect",
            "object": "cat",
            "boxes": [{"x_min": 0.1, "y_min": 0.1, "x_max": 0.2, "y_max": 0.2}],
        },
        {"image": "r.jpg", "skill": "point", "object": "nose", "points": [[0.5, 0.5]], "id": "n"},
        {
            "image": "r.jpg",
            "skill": "point",
            "object": "ear",
            "boxes": [[4, 8, 20, 40]],
            "coordinates": "pixels",
        },
        {"skill": "query", "question": "Why?", "answer": "because"},
    ]
    manifest = tmp_path / "set.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n# comment\n")
    dataset = load_dataset(tmp_path)
    assert len(dataset) == 5
    assert dataset[0].boxes == (Box(x_min=0.25, y_min=0.25, x_max=0.75, y_max=0.75),)
    assert dataset[0].id == "set.jsonl:1"
    assert dataset[1].boxes == (Box(x_min=0.1, y_min=0.1, x_max=0.2, y_max=0.2),)
    assert dataset[2].points == (Point(x=0.5, y=0.5),) and dataset[2].id == "n"
    assert dataset[3].boxes == (Box(x_min=0.1, y_min=0.1, x_max=0.5, y_max=0.5),)
    assert dataset[4].answers == ("because",) and dataset[4].image is None
    assert len(load_dataset(manifest, skill="point")) == 2
    manifest.write_text(json.dumps({"image": "r.jpg", "skill": "detect", "object": "dog"}) + "\n")
    with pytest.raises(DatasetError, match=r"set\.jsonl line 1: detect needs 'boxes'"):
        load_dataset(manifest)
