"""COCO detection JSON (``images``, ``annotations``, ``categories``) to annotated images.

Boxes are COCO ``[x, y, width, height]`` in pixels, normalized by the image's
``width``/``height`` from the JSON (read from the file header when absent). Crowd
annotations (``iscrowd: 1``) mark regions of many instances; they are skipped unless
``include_crowd``. Images are looked up under ``image_root``, directly or in an
``images/`` subfolder; by default ``image_root`` is the JSON's folder, or its parent
when the JSON sits in an ``annotations/`` folder (the usual COCO layout).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning_moondream.api.models import Box
from lightning_moondream.data.errors import DatasetError
from lightning_moondream.data.geometry import normalize_box
from lightning_moondream.data.records import AnnotatedImage
from lightning_moondream.data.sources.files import (
    find_image,
    header_size,
    image_candidates,
    missing_image,
    read_json,
)


def coco_split_files(root: Path, prefix: str = "instances") -> dict[str, tuple[Path, Path]]:
    """The splits of a COCO root: ``annotations/<prefix>_<split>.json`` and their images.

    A split's images are in ``<split>/`` (e.g. ``val2017/``) or ``images/<split>/``,
    else in the root.
    """
    found = {}
    for path in sorted((root / "annotations").glob(f"{prefix}_*.json")):
        name = path.stem[len(prefix) + 1 :]
        folders = (root / name, root / "images" / name)
        found[name] = (path, next((folder for folder in folders if folder.is_dir()), root))
    return found


def read_coco_file(path: str | Path) -> dict[str, Any]:
    """Read and check the structure of a COCO JSON file.

    Raises:
        DatasetError: If the file is missing, malformed or lacks ``images``,
            ``annotations`` or ``categories`` lists.
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a COCO file must hold a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: no {key!r} list; is this a COCO annotation file?")
    return data


def coco_categories(data: Mapping[str, Any], source: str) -> dict[int, dict[str, Any]]:
    """Map category id to its category object, checking each has an id and a name."""
    categories: dict[int, dict[str, Any]] = {}
    for position, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise DatasetError(f"{source} categories[{position}]: needs an 'id' and a 'name'")
        categories[category["id"]] = category
    return categories


def coco_groups(data: Mapping[str, Any]) -> frozenset[str]:
    """Supercategory names that group other categories (Roboflow's ``pieces``).

    A category that is its own supercategory (COCO's ``person``) groups nothing.
    """
    return frozenset(
        str(category["supercategory"])
        for category in data["categories"]
        if isinstance(category, dict)
        and category.get("supercategory") not in (None, "", "none", category.get("name"))
    )


def default_image_root(annotation_file: Path) -> Path:
    """The images' folder when none is given: beside the JSON, or above ``annotations/``."""
    folder = annotation_file.parent
    return folder.parent if folder.name == "annotations" else folder


def coco_image_table(
    data: Mapping[str, Any],
    source: str,
    image_root: Path,
    *,
    strict: bool,
    image_ids: Iterable[int] | None = None,
) -> dict[int, tuple[Path, tuple[int, int]]]:
    """Map image id to its file and displayed size, skipping (or refusing) missing files."""
    table: dict[int, tuple[Path, tuple[int, int]]] = {}
    folders = [image_root, image_root / "images"]
    wanted = set(image_ids) if image_ids is not None else None
    for position, entry in enumerate(data["images"]):
        where = f"{source} images[{position}]"
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise DatasetError(f"{where}: needs an 'id' and a 'file_name'")
        if wanted is not None and entry["id"] not in wanted:
            continue
        path = find_image(image_candidates(folders, entry["file_name"]))
        if path is None:
            missing_image(
                f"{where}: image {entry['file_name']!r} not found in {image_root}", strict
            )
            continue
        width, height = entry.get("width"), entry.get("height")
        if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
            size = (width, height)
        else:
            size = header_size(path, where)
        table[entry["id"]] = (path, size)
    return table


def _labelled_box(
    annotation: Mapping[str, Any],
    categories: Mapping[int, dict[str, Any]],
    size: tuple[int, int],
    where: str,
    strict: bool,
) -> tuple[Box, str] | None:
    """An annotation's box in the image and its class; ``None`` if dropped with a warning."""
    category_id: Any = annotation.get("category_id")
    category = categories.get(category_id)
    if category is None:
        raise DatasetError(
            f"{where}: category id {category_id!r} is not among the {len(categories)} categories"
        )
    bbox = annotation.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise DatasetError(f"{where}: 'bbox' must be [x, y, width, height], got {bbox!r}")
    x, y, width, height = bbox
    box = normalize_box((x, y, x + width, y + height), size, where=where, strict=strict)
    return None if box is None else (box, category["name"])


def read_coco(
    annotation_file: str | Path,
    image_root: str | Path | None = None,
    *,
    strict: bool = False,
    include_crowd: bool = False,
    data: Mapping[str, Any] | None = None,
    image_ids: Iterable[int] | None = None,
) -> tuple[list[AnnotatedImage], list[str]]:
    """Read COCO detection annotations.

    Args:
        annotation_file: The JSON file (named in messages even when ``data`` is given).
        image_root: Folder of the images; defaults to the JSON file's folder.
        strict: Refuse boxes outside the image or without area, and missing images,
            instead of clamping or skipping them with a warning.
        include_crowd: Keep ``iscrowd`` regions as boxes.
        data: The parsed JSON, when already loaded (e.g. by pycocotools).
        image_ids: Keep only these images, in this order; default: all, in file order.

    Returns:
        The annotated images (including images without boxes) and the class names in
        category order.

    Raises:
        DatasetError: Naming the file and annotation, for malformed annotations or an
            unknown category id.
    """
    path = Path(annotation_file)
    source = str(path)
    data = data if data is not None else read_coco_file(path)
    root = Path(image_root) if image_root is not None else default_image_root(path)
    categories = coco_categories(data, source)
    ids = list(image_ids) if image_ids is not None else None
    table = coco_image_table(data, source, root, strict=strict, image_ids=ids)
    boxes: dict[int, list[tuple[Box, str]]] = {image_id: [] for image_id in table}
    for position, annotation in enumerate(data["annotations"]):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        if image_id not in table or (annotation.get("iscrowd") and not include_crowd):
            continue
        where = f"{source} annotations[{position}] (id {annotation.get('id')})"
        found = _labelled_box(annotation, categories, table[image_id][1], where, strict)
        if found is not None:
            boxes[image_id].append(found)
    order = ids if ids is not None else list(table)
    images = [
        AnnotatedImage(
            image=str(table[image_id][0]),
            boxes=tuple(box for box, _ in boxes[image_id]),
            labels=tuple(name for _, name in boxes[image_id]),
            id=table[image_id][0].name,
            size=table[image_id][1],
        )
        for image_id in order
        if image_id in table
    ]
    return images, [category["name"] for category in categories.values()]
