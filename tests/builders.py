"""Builders of tiny dataset trees in a temporary folder, shared by the data tests."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def save_image(
    path: Path, size: tuple[int, int] = (64, 48), color=(200, 30, 30), **save_args
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, **save_args)
    return path


def exif_rotated_jpeg(path: Path, stored: tuple[int, int] = (80, 40), orientation: int = 6) -> Path:
    """A JPEG stored ``stored`` (w, h) with an EXIF orientation tag."""
    image = Image.new("RGB", stored, (10, 120, 240))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=exif.tobytes())
    return path


def voc_xml(
    path: Path, filename: str, size: tuple[int, int], objects: list[tuple[str, tuple]]
) -> Path:
    parts = [f"<annotation><filename>{filename}</filename>"]
    parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, (x0, y0, x1, y1) in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts))
    return path


def _coco_annotation(
    annotation_id: int, image_id: int, category_id: int, bbox: list[int], iscrowd: int = 0, **extra
) -> dict:
    """One COCO annotation: an ``xywh`` pixel box, and any more fields (e.g. keypoints)."""
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "iscrowd": iscrowd,
        **extra,
    }


def coco_tree(root: Path) -> Path:
    """Three 100x50 images; cat and dog boxes; one crowd box; keypoints on image 1."""
    for index in (1, 2, 3):
        save_image(root / "images" / f"{index}.jpg", (100, 50))
    data = {
        "images": [
            {"id": index, "file_name": f"{index}.jpg", "width": 100, "height": 50}
            for index in (1, 2, 3)
        ],
        "categories": [
            {"id": 1, "name": "cat", "keypoints": ["left_eye", "right_eye"]},
            {"id": 7, "name": "dog"},
        ],
        "annotations": [
            _coco_annotation(10, 1, 1, [10, 5, 20, 10], keypoints=[15, 8, 2, 0, 0, 0]),
            _coco_annotation(11, 1, 1, [50, 20, 30, 20], keypoints=[55, 25, 1, 60, 25, 2]),
            _coco_annotation(12, 1, 7, [0, 0, 100, 50]),
            _coco_annotation(13, 2, 7, [25, 0, 50, 25]),
            _coco_annotation(14, 2, 7, [0, 0, 10, 10], iscrowd=1),
        ],
    }
    path = root / "annotations" / "instances.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def voc_devkit(root: Path) -> Path:
    for image_id, objects in {
        "a": [("cell", (10, 10, 30, 20)), ("cell", (40, 5, 60, 45)), ("virus", (1, 1, 5, 5))],
        "b": [("virus", (0, 0, 64, 48))],
        "c": [],
    }.items():
        save_image(root / "JPEGImages" / f"{image_id}.jpg")
        voc_xml(root / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", (64, 48), objects)
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    (main / "train.txt").write_text("a\nb\n")
    (main / "val.txt").write_text("c\n")
    return root


def yolo_tree(root: Path) -> Path:
    (root / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/val\nnames: [apple, pear, plum]\n"
    )
    save_image(root / "images" / "train" / "x.jpg")
    save_image(root / "images" / "train" / "y.png")
    save_image(root / "images" / "val" / "z.jpg")
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "train" / "x.txt").write_text("0 0.5 0.5 0.2 0.4\n2 0.25 0.25 0.1 0.1\n")
    (root / "labels" / "val" / "z.txt").write_text("1 0.1 0.2 0.3 0.2 0.3 0.4 0.1 0.4\n")
    return root
