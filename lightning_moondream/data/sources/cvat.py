"""CVAT for images 1.1 XML (``annotations.xml``) to annotated images.

The file is ``<annotations>`` with ``<meta>`` (whose ``<labels>`` name the classes) and
one ``<image id name width height>`` per image, holding its shapes in pixels of the
displayed image:

- ``<box label xtl ytl xbr ybr occluded rotation>``: a box; a rotated box (clockwise
  about its centre) becomes the box around it;
- ``<polygon>``, ``<polyline>`` and ``<points points="x,y;x,y;...">``: the box around the
  points, except a ``<points>`` of a single point, which is a keypoint;
- ``<ellipse cx cy rx ry>`` and ``<mask left top width height>``: the box around them.

Other shapes (``<cuboid>``, ``<skeleton>``, ``<tag>``) are skipped with a warning (refused
when ``strict``). ``occluded="1"`` is kept as the box's ``occluded`` flag. Images are
looked up by ``name`` under ``image_root`` (default: the XML's folder), directly or in
``images/``, and by file name alone.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from lightning_moondream.data.errors import DatasetError, warn
from lightning_moondream.data.records import AnnotatedImage, AnnotationCollector
from lightning_moondream.data.sources.files import (
    find_image,
    header_size,
    image_candidates,
    missing_image,
    read_xml_root,
    xml_root_tag,
)
from lightning_moondream.data.sources.shapes import bounding_box, parse_point_list, rotated_box

_BOXED = ("polygon", "polyline", "points")
_SKIPPED = ("cuboid", "skeleton", "tag")


def is_cvat_file(path: Path) -> bool:
    """Tell whether ``path`` is a CVAT XML file (root element ``<annotations>``)."""
    return path.suffix.lower() == ".xml" and xml_root_tag(path) == "annotations"


def find_cvat(path: Path) -> Path | None:
    """The CVAT XML of ``path``: the file itself, or the one such file in a folder.

    Raises:
        DatasetError: If a folder holds several CVAT XML files.
    """
    if path.is_file():
        return path if is_cvat_file(path) else None
    files = [xml for xml in sorted(path.glob("*.xml")) if is_cvat_file(xml)]
    if len(files) > 1:
        names = ", ".join(xml.name for xml in files)
        raise DatasetError(f"{path}: several CVAT XML files ({names}); pass the one to use")
    return files[0] if files else None


def _number(element: ET.Element, name: str, where: str) -> float:
    value = element.get(name)
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{where}: attribute {name}={value!r} is not a number") from exc


def _shape_box(element: ET.Element, where: str) -> tuple[float, ...]:
    tag = element.tag
    if tag == "box":
        x0, y0 = _number(element, "xtl", where), _number(element, "ytl", where)
        x1, y1 = _number(element, "xbr", where), _number(element, "ybr", where)
        degrees = float(element.get("rotation") or 0.0)
        center = ((x0 + x1) / 2, (y0 + y1) / 2)
        return rotated_box(x0, y0, x1 - x0, y1 - y0, degrees, center)
    if tag == "ellipse":
        cx, cy = _number(element, "cx", where), _number(element, "cy", where)
        rx, ry = _number(element, "rx", where), _number(element, "ry", where)
        return cx - rx, cy - ry, cx + rx, cy + ry
    if tag == "mask":
        left, top = _number(element, "left", where), _number(element, "top", where)
        width, height = _number(element, "width", where), _number(element, "height", where)
        # The mask covers pixels left .. left + width - 1, so its edges are these.
        return left, top, left + width, top + height
    return bounding_box(parse_point_list(element.get("points") or "", where), where)


def _meta_labels(root: ET.Element) -> list[str]:
    return [
        name
        for label in root.findall("./meta//labels/label")
        if (name := (label.findtext("name") or "").strip())
    ]


def read_cvat(
    annotation_file: str | Path,
    image_root: str | Path | None = None,
    *,
    strict: bool = False,
) -> tuple[list[AnnotatedImage], list[str]]:
    """Read a CVAT for images 1.1 XML file (see the module docstring).

    Args:
        annotation_file: The XML file.
        image_root: Folder of the images; default: the XML's folder.
        strict: Refuse boxes outside the image or without area, missing images and
            shapes that are not read, instead of clamping or skipping them with a warning.

    Returns:
        The annotated images and the class names (from ``<meta>``, else those used).

    Raises:
        DatasetError: Naming the file, image and shape, for malformed XML, a shape
            without coordinates, or a label not in ``<meta>``.
    """
    path = Path(annotation_file)
    root = read_xml_root(path, "annotations", "CVAT")
    if root.find("image") is None and root.find("track") is not None:
        raise DatasetError(f"{path}: CVAT for video (tracks); export as 'CVAT for images 1.1'")
    declared = _meta_labels(root)
    folder = Path(image_root) if image_root is not None else path.parent
    images: list[AnnotatedImage] = []
    used: set[str] = set()
    for position, element in enumerate(root.findall("image")):
        image = _read_image(element, path, position, folder, declared, used, strict)
        if image is not None:
            images.append(image)
    return images, declared or sorted(used)


def _read_image(
    element: ET.Element,
    path: Path,
    position: int,
    folder: Path,
    declared: list[str],
    used: set[str],
    strict: bool,
) -> AnnotatedImage | None:
    """One ``<image>`` and its shapes; ``None`` for a missing image not refused."""
    name = element.get("name")
    if not name:
        raise DatasetError(f"{path} <image> {position}: no 'name' attribute")
    where_image = f"{path} image {name!r}"
    names = [name, Path(name).name]
    folders = [folder, folder / "images"]
    found = find_image(p for n in names for p in image_candidates(folders, n))
    if found is None:
        missing_image(f"{where_image}: not found in {folder}", strict)
        return None
    width, height = element.get("width"), element.get("height")
    size = (
        (int(width), int(height))
        if width and height and width.isdigit() and height.isdigit()
        else header_size(found, where_image)
    )
    collector = AnnotationCollector(size, strict=strict)
    for index, shape in enumerate(element):
        where_shape = f"{where_image} <{shape.tag}> {index}"
        label = _shape_label(shape, where_shape, declared, strict)
        if label is not None:
            used.add(label)
            _add_shape(collector, shape, label, f"{where_shape} ({label})")
    return collector.build(str(found), found.name)


def _shape_label(shape: ET.Element, where: str, declared: list[str], strict: bool) -> str | None:
    """The label of a shape to read; ``None`` for a shape skipped with a warning."""
    label = shape.get("label")
    if shape.tag in _SKIPPED or label is None:
        message = f"{where}: not a box, polygon, points, ellipse or mask shape"
        if strict:
            raise DatasetError(message)
        warn(message + "; skipped")
        return None
    if declared and label not in declared:
        raise DatasetError(
            f"{where} ({label}): label {label!r} is not among the labels of <meta>: "
            f"{', '.join(declared)}"
        )
    return label


def _add_shape(collector: AnnotationCollector, shape: ET.Element, label: str, where: str) -> None:
    """Add a shape as a keypoint (a ``<points>`` of one point) or as the box around it."""
    if shape.tag == "points":
        pairs = parse_point_list(shape.get("points") or "", where)
        if len(pairs) == 1:
            collector.add_point(pairs[0], label, where=where)
            return
    elif shape.tag not in (*_BOXED, "box", "ellipse", "mask"):
        raise DatasetError(f"{where}: unknown shape <{shape.tag}>")
    collector.add_box(
        _shape_box(shape, where), label, where=where, occluded=shape.get("occluded") == "1"
    )
