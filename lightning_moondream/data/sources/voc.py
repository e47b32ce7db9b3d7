"""Pascal VOC XML annotations to annotated images: devkit layout or a flat folder.

Two layouts are read:

- devkit: ``ImageSets/Main/{split}.txt`` lists image ids; ``Annotations/{id}.xml``
  and ``JPEGImages/{id}.jpg`` hold annotations and images;
- flat: a folder of ``.xml`` files (directly, or in ``annotations/``/``Annotations/``),
  the images beside them or in ``images/``/``JPEGImages/``, found by the XML's
  ``<filename>`` or else by the XML's stem.

Boxes ``<bndbox>`` are pixel coordinates, taken as box edges as torchvision does, and
normalized by the image's displayed size read from its header: ``<size>`` in VOC files is
often wrong or missing, and a disagreement is reported as a warning naming the file.
Objects marked ``difficult`` are kept unless ``include_difficult=False``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning_moondream.api.models import Box
from lightning_moondream.data.errors import DatasetError, warn
from lightning_moondream.data.geometry import normalize_box
from lightning_moondream.data.records import AnnotatedImage
from lightning_moondream.data.sources.files import (
    find_image,
    header_size,
    image_candidates,
    missing_image,
    read_xml_root,
)

_ANNOTATION_FOLDERS = ("annotations", "Annotations")
_IMAGE_FOLDERS = ("images", "JPEGImages")


@dataclass(frozen=True)
class VocObject:
    """One ``<object>`` of a VOC file, in pixels."""

    name: str
    xyxy: tuple[float, float, float, float]
    difficult: bool


@dataclass(frozen=True)
class VocFile:
    """A parsed VOC XML file."""

    path: Path
    filename: str | None
    size: tuple[int, int] | None
    objects: tuple[VocObject, ...]


def _text(element: ET.Element, tag: str) -> str | None:
    child = element.find(tag)
    return child.text.strip() if child is not None and child.text else None


def parse_voc_xml(path: Path) -> VocFile:
    """Parse one VOC XML file.

    Raises:
        DatasetError: Naming the file and object, if the file is missing, not XML, or
            an object lacks a name or a numeric box.
    """
    root = read_xml_root(path, "annotation", "VOC")
    size = None
    size_element = root.find("size")
    if size_element is not None:
        try:
            width, height = (
                int(_text(size_element, "width") or 0),
                int(_text(size_element, "height") or 0),
            )
        except ValueError as exc:
            raise DatasetError(f"{path}: <size> is not a pair of integers") from exc
        size = (width, height) if width > 0 and height > 0 else None
    objects = []
    for position, element in enumerate(root.findall("object")):
        where = f"{path} object {position}"
        name = _text(element, "name")
        if not name:
            raise DatasetError(f"{where}: no <name>")
        bndbox = element.find("bndbox")
        if bndbox is None:
            raise DatasetError(f"{where} ({name}): no <bndbox>")
        try:
            xyxy = tuple(
                float(_text(bndbox, tag) or "nan") for tag in ("xmin", "ymin", "xmax", "ymax")
            )
        except ValueError as exc:
            raise DatasetError(f"{where} ({name}): <bndbox> coordinates are not numbers") from exc
        difficult = (_text(element, "difficult") or "0") not in ("0", "false")
        objects.append(VocObject(name, xyxy, difficult))  # type: ignore[arg-type]
    return VocFile(path, _text(root, "filename"), size, tuple(objects))


def voc_images(
    parsed: Sequence[tuple[VocFile, Path | None]],
    *,
    classes: Sequence[str] | None = None,
    strict: bool = False,
    include_difficult: bool = True,
) -> tuple[list[AnnotatedImage], list[str]]:
    """Turn parsed VOC files and their images into annotated images.

    Args:
        parsed: Each parsed annotation file with its image (``None`` if not found).
        classes: The class list; default: every name found, sorted.
        strict: Refuse boxes outside the image, without area, and missing images,
            instead of clamping or skipping them with a warning.
        include_difficult: Keep objects marked difficult.

    Raises:
        DatasetError: Naming the file and object, for malformed files or, when
            ``classes`` is given, a name not among them.
    """
    names = sorted({obj.name for voc, _ in parsed for obj in voc.objects})
    known = list(classes) if classes is not None else names
    images = []
    for voc, image in parsed:
        if image is None:
            missing_image(f"{voc.path}: image {voc.filename or voc.path.stem!r} not found", strict)
            continue
        size = header_size(image, str(voc.path))
        if voc.size is not None and voc.size != size:
            warn(
                f"{voc.path}: <size> says {voc.size[0]}x{voc.size[1]} but {image.name} is "
                f"{size[0]}x{size[1]}; boxes are normalized by the image"
            )
        boxes: list[Box] = []
        labels: list[str] = []
        for position, obj in enumerate(voc.objects):
            where = f"{voc.path} object {position} ({obj.name})"
            if obj.name not in known:
                raise DatasetError(f"{where}: class {obj.name!r} is not among {len(known)} classes")
            if obj.difficult and not include_difficult:
                continue
            box = normalize_box(obj.xyxy, size, where=where, strict=strict)
            if box is not None:
                boxes.append(box)
                labels.append(obj.name)
        images.append(AnnotatedImage(str(image), tuple(boxes), tuple(labels), image.name, size))
    return images, known


def _subfolder(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / name for name in names if (root / name).is_dir()), None)


def is_voc_devkit(root: Path) -> bool:
    """Tell whether ``root`` has the devkit layout."""
    return (root / "ImageSets" / "Main").is_dir() and (root / "Annotations").is_dir()


def voc_annotation_folder(root: Path) -> Path:
    """The folder of a flat layout's XML files: ``annotations/``, ``Annotations/`` or ``root``."""
    return _subfolder(root, _ANNOTATION_FOLDERS) or root


def voc_split_ids(root: Path, split: str) -> list[str]:
    """Image ids listed in ``ImageSets/Main/{split}.txt``.

    Raises:
        DatasetError: If the split file does not exist, naming the splits that do.
    """
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        available = sorted(path.stem for path in (root / "ImageSets" / "Main").glob("*.txt"))
        raise DatasetError(
            f"{split_file}: no such split; available: {', '.join(available) or 'none'}"
        )
    return [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]


def read_voc_devkit(
    root: str | Path,
    split: str = "train",
    *,
    classes: Sequence[str] | None = None,
    strict: bool = False,
    include_difficult: bool = True,
) -> tuple[list[AnnotatedImage], list[str]]:
    """Read a devkit-layout folder; the options are those of :func:`voc_images`.

    Raises:
        DatasetError: For a missing split file, a missing annotation file, or a
            malformed annotation.
    """
    root = Path(root)
    parsed = []
    for image_id in voc_split_ids(root, split):
        voc = parse_voc_xml(root / "Annotations" / f"{image_id}.xml")
        names = [image_id] + ([voc.filename] if voc.filename else [])
        folders = [root / "JPEGImages"]
        image = find_image(path for name in names for path in image_candidates(folders, name))
        parsed.append((voc, image))
    if classes is None:
        # Every split gets the same class list (and so the same negative prompts), so
        # names are gathered from all annotation files, not just this split's.
        listed = {voc.path for voc, _ in parsed}
        others = sorted(set((root / "Annotations").glob("*.xml")) - listed)
        found = {obj.name for voc, _ in parsed for obj in voc.objects}
        found |= {obj.name for path in others for obj in parse_voc_xml(path).objects}
        classes = sorted(found)
    return voc_images(parsed, classes=classes, strict=strict, include_difficult=include_difficult)


def read_voc_flat(
    root: str | Path,
    *,
    classes: Sequence[str] | None = None,
    strict: bool = False,
    include_difficult: bool = True,
) -> tuple[list[AnnotatedImage], list[str]]:
    """Read a flat folder of VOC XML files and images; options as in :func:`voc_images`."""
    root = Path(root)
    xml_folder = voc_annotation_folder(root)
    image_folders = [xml_folder]
    image_folder = _subfolder(root, _IMAGE_FOLDERS)
    if image_folder is not None:
        image_folders.append(image_folder)
    if xml_folder != root:
        image_folders.append(root)
    parsed = []
    for xml in sorted(xml_folder.glob("*.xml")):
        voc = parse_voc_xml(xml)
        names = ([voc.filename] if voc.filename else []) + [xml.stem]
        candidates = (path for name in names for path in image_candidates(image_folders, name))
        parsed.append((voc, find_image(candidates)))
    return voc_images(parsed, classes=classes, strict=strict, include_difficult=include_difficult)
