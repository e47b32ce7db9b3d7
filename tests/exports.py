"""Exports as labelling tools write them, built in a temporary folder for the export tests.

Every builder returns the folder (or file) a user would name, and the boxes it holds
in pixels, so tests can check each box after loading.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

from builders import exif_rotated_jpeg, save_image, voc_xml

SIZE = (100, 50)


def roboflow_yolo(root: Path) -> Path:
    """Roboflow's YOLO export: ``../`` entries, ``valid/``, a ``test/`` data.yaml omits."""
    root.mkdir(parents=True)
    (root / "data.yaml").write_text(
        "train: ../train/images\nval: ../valid/images\n\nnc: 2\nnames: ['cat', 'dog']\n\n"
        "roboflow:\n  workspace: me\n  project: pets\n  version: 1\n"
    )
    labels = {
        "train": {"t1": "0 0.5 0.5 0.2 0.4\n1 0.25 0.25 0.1 0.1\n"},
        "valid": {"v1": "1 0.1 0.2 0.3 0.2 0.3 0.4 0.1 0.4\n"},
        "test": {"s1": "0 0.5 0.5 1 1\n"},
    }
    for split, files in labels.items():
        for stem, text in files.items():
            save_image(root / split / "images" / f"{stem}.jpg", SIZE)
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
            (root / split / "labels" / f"{stem}.txt").write_text(text)
    return root


def coco_json(images: list[tuple[int, str]], boxes: list[tuple[int, int, int, list]]) -> dict:
    return {
        "info": {"description": "export"},
        "categories": [
            {"id": 0, "name": "pets", "supercategory": "none"},
            {"id": 1, "name": "cat", "supercategory": "pets"},
            {"id": 2, "name": "dog", "supercategory": "pets"},
        ],
        "images": [
            {"id": i, "file_name": name, "width": SIZE[0], "height": SIZE[1]} for i, name in images
        ],
        "annotations": [
            {"id": a, "image_id": i, "category_id": c, "bbox": b, "area": 1, "iscrowd": 0}
            for a, i, c, b in boxes
        ],
    }


def roboflow_coco_folder(
    folder: Path, images: list[tuple[int, str]], boxes: list[tuple[int, int, int, list]]
) -> Path:
    """One split folder of Roboflow's COCO export: images beside ``_annotations.coco.json``."""
    for _, name in images:
        save_image(folder / name, SIZE)
    (folder / "_annotations.coco.json").write_text(json.dumps(coco_json(images, boxes)))
    return folder


def roboflow_coco(root: Path) -> Path:
    """Roboflow's COCO export: one folder per split, images beside ``_annotations.coco.json``."""
    roboflow_coco_folder(
        root / "train",
        [(0, "a_jpg.rf.1.jpg")],
        [(0, 0, 1, [10, 5, 20, 10]), (1, 0, 2, [0, 0, 100, 50])],
    )
    roboflow_coco_folder(root / "valid", [(0, "b_jpg.rf.2.jpg")], [(0, 0, 2, [50, 25, 25, 20])])
    return root


CHESS_PIECES = ("black-bishop", "white-bishop", "black-king", "white-king")


def roboflow_chess(folder: Path) -> Path:
    """A split folder of a Roboflow COCO export as Roboflow writes categories.

    Category 0 is the project's supercategory ``pieces`` (``supercategory: "none"``, no
    boxes); the others have ``supercategory: "pieces"``. ``b0.jpg`` to ``b5.jpg`` hold
    one of each of the four pieces; ``b6.jpg`` a black king and the export's only
    ``bishop``, a stray class beside ``black-bishop`` and ``white-bishop``.
    """
    names = ("pieces", "bishop", *CHESS_PIECES)
    categories = [
        {"id": i, "name": name, "supercategory": "none" if i == 0 else "pieces"}
        for i, name in enumerate(names)
    ]
    contents = [CHESS_PIECES] * 6 + [("black-king", "bishop")]
    boxes = [
        (image, names.index(piece), [10 * slot, 5, 10, 10])
        for image, pieces in enumerate(contents)
        for slot, piece in enumerate(pieces)
    ]
    images = [(image, f"b{image}.jpg") for image in range(len(contents))]
    numbered = [(a, i, c, b) for a, (i, c, b) in enumerate(boxes)]
    data = {**coco_json(images, numbered), "categories": categories}
    for _, name in images:
        save_image(folder / name, SIZE)
    (folder / "_annotations.coco.json").write_text(json.dumps(data))
    return folder


def coco_2017(root: Path) -> Path:
    """COCO's own layout: ``annotations/instances_<split>.json`` beside ``<split>/``."""
    for split, name in (("train2017", "000000000009.jpg"), ("val2017", "000000000139.jpg")):
        save_image(root / split / name, SIZE)
        data = coco_json([(1, name)], [(7, 1, 1, [30, 10, 40, 20])])
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def voc_folder(folder: Path, objects: list[tuple[str, tuple[int, int, int, int]]]) -> Path:
    """One split folder of Roboflow's VOC export: an image with its XML beside it."""
    stem = f"{folder.name}_img"
    save_image(folder / f"{stem}.jpg", SIZE)
    voc_xml(folder / f"{stem}.xml", f"{stem}.jpg", SIZE, objects)
    return folder


def voc_split_folders(root: Path) -> Path:
    """Roboflow's VOC export: per-split folders of images with their XML beside them."""
    voc_folder(root / "train", [("cat", (10, 5, 30, 15))])
    voc_folder(root / "valid", [("dog", (0, 0, 50, 50))])
    return root


def jsonl_folder(folder: Path) -> Path:
    """A folder holding one JSONL manifest beside its image."""
    save_image(folder / "a.jpg", SIZE)
    line = {"image": "a.jpg", "skill": "detect", "object": "cat", "boxes": [[10, 5, 30, 15]]}
    (folder / "manifest.jsonl").write_text(json.dumps(line) + "\n")
    return folder


SPLIT_FOLDERS = ("train", "valid", "test")


def split_root(root: Path, build: Callable[[Path], object]) -> Path:
    """A root of ``train/``, ``valid/`` and ``test/``, each an export made by ``build``."""
    for split in SPLIT_FOLDERS:
        build(root / split)
    return root


CVAT_XML = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta>
    <task>
      <id>7</id>
      <name>pets</name>
      <labels>
        <label><name>cat</name><color>#fa3253</color><type>any</type><attributes></attributes></label>
        <label><name>dog</name><color>#3d3df5</color><type>any</type><attributes></attributes></label>
        <label><name>nose</name><color>#33ddff</color><type>points</type><attributes></attributes></label>
      </labels>
    </task>
  </meta>
  <image id="0" name="photos/one.jpg" width="100" height="50">
    <box label="cat" source="manual" occluded="1" xtl="10.00" ytl="5.00" xbr="30.00" ybr="25.00" z_order="0">
      <attribute name="color">black</attribute>
    </box>
    <box label="dog" source="manual" occluded="0" xtl="40.00" ytl="20.00" xbr="60.00" ybr="30.00" rotation="90.0" z_order="0">
    </box>
    <polygon label="dog" source="manual" occluded="0" points="70.00,10.00;90.00,5.00;80.00,40.00" z_order="0">
    </polygon>
    <points label="nose" source="manual" occluded="0" points="20.50,12.00" z_order="0">
    </points>
    <points label="cat" source="manual" occluded="0" points="1.00,2.00;11.00,22.00" z_order="0">
    </points>
  </image>
  <image id="1" name="photos/two.jpg" width="100" height="50">
  </image>
</annotations>
"""


def cvat_export(root: Path) -> Path:
    """CVAT for images 1.1: ``annotations.xml`` beside ``images/`` (with the task's subfolders)."""
    save_image(root / "images" / "photos" / "one.jpg", SIZE)
    save_image(root / "images" / "photos" / "two.jpg", SIZE)
    (root / "annotations.xml").write_text(CVAT_XML)
    return root


def label_studio_export(root: Path) -> tuple[Path, Path]:
    """A Label Studio JSON export and, apart from it, the folder the user keeps images in.

    ``cat.jpg`` was uploaded (Label Studio stores it as ``/data/upload/1/3f2a9c1e-cat.jpg``);
    ``photos/tall.jpg`` is served as a local file and stored 80x40 with EXIF rotation 6,
    so it is displayed (and annotated) 40x80.
    """
    images = root / "pictures"
    save_image(images / "cat.jpg", SIZE)
    exif_rotated_jpeg(images / "photos" / "tall.jpg", stored=(80, 40), orientation=6)
    region = {"from_name": "label", "to_name": "image", "image_rotation": 0}
    tasks = [
        {
            "id": 11,
            "data": {"image": "/data/upload/1/3f2a9c1e-cat.jpg"},
            "annotations": [
                {"id": 1, "was_cancelled": True, "result": []},
                {
                    "id": 2,
                    "was_cancelled": False,
                    "result": [
                        {
                            **region,
                            "id": "r1",
                            "type": "rectanglelabels",
                            "original_width": 100,
                            "original_height": 50,
                            "value": {
                                "x": 10,
                                "y": 20,
                                "width": 30,
                                "height": 40,
                                "rotation": 0,
                                "rectanglelabels": ["cat"],
                            },
                        },
                        {
                            **region,
                            "id": "r2",
                            "type": "rectanglelabels",
                            "original_width": 100,
                            "original_height": 50,
                            "value": {
                                "x": 50,
                                "y": 10,
                                "width": 20,
                                "height": 20,
                                "rotation": 90,
                                "rectanglelabels": ["dog"],
                            },
                        },
                        {
                            **region,
                            "id": "k1",
                            "type": "keypointlabels",
                            "original_width": 100,
                            "original_height": 50,
                            "value": {"x": 25, "y": 50, "width": 0.5, "keypointlabels": ["nose"]},
                        },
                    ],
                },
            ],
            "predictions": [],
        },
        {
            "id": 12,
            "data": {"image": "/data/local-files/?d=photos/tall.jpg"},
            "annotations": [
                {
                    "id": 3,
                    "result": [
                        {
                            **region,
                            "id": "r3",
                            "type": "rectanglelabels",
                            "original_width": 40,
                            "original_height": 80,
                            "value": {
                                "x": 25,
                                "y": 50,
                                "width": 50,
                                "height": 25,
                                "rotation": 0,
                                "rectanglelabels": ["cat"],
                            },
                        }
                    ],
                }
            ],
        },
    ]
    export = root / "export" / "project-1-at-2024-05-01-10-00-abc123.json"
    export.parent.mkdir(parents=True)
    export.write_text(json.dumps(tasks, indent=2))
    return export, images


def label_studio_folder(folder: Path) -> Path:
    """A Label Studio JSON export with the images in a subfolder beside it."""
    export, _ = label_studio_export(folder)
    export.rename(folder / export.name)
    export.parent.rmdir()
    return folder


def labelme_folder(root: Path) -> Path:
    """LabelMe files in ``json/``, images in ``images/`` (``imagePath`` relative); one image embedded."""
    save_image(root / "images" / "a.jpg", SIZE)
    shapes = [
        {
            "label": "cat",
            "points": [[30, 25], [10, 5]],
            "group_id": None,
            "description": "",
            "shape_type": "rectangle",
            "flags": {},
        },
        {
            "label": "dog",
            "points": [[60, 10], [90, 20], [70, 45]],
            "group_id": None,
            "description": "",
            "shape_type": "polygon",
            "flags": {},
        },
        {
            "label": "nose",
            "points": [[50, 25]],
            "group_id": None,
            "description": "",
            "shape_type": "point",
            "flags": {},
        },
    ]
    entry = {
        "version": "5.4.1",
        "flags": {},
        "shapes": shapes,
        "imagePath": "../images/a.jpg",
        "imageData": None,
        "imageHeight": 50,
        "imageWidth": 100,
    }
    (root / "json").mkdir(parents=True)
    (root / "json" / "a.json").write_text(json.dumps(entry, indent=2))
    embedded = save_image(root / "scratch" / "b.png", SIZE, format="PNG").read_bytes()
    (root / "scratch" / "b.png").unlink()
    shapes_b = [
        {
            "label": "dog",
            "points": [[0, 0], [100, 50]],
            "group_id": None,
            "shape_type": "rectangle",
            "flags": {},
        }
    ]
    entry_b = {
        "version": "5.4.1",
        "flags": {},
        "shapes": shapes_b,
        "imagePath": "b.png",
        "imageData": base64.b64encode(embedded).decode(),
        "imageHeight": 50,
        "imageWidth": 100,
    }
    (root / "json" / "b.json").write_text(json.dumps(entry_b))
    return root
