"""Helpers shared by the folder-format readers: reading files and finding images."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from lightning_moondream.data.errors import DatasetError, warn
from lightning_moondream.images import ImageError, displayed_size

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def read_json(path: Path) -> Any:
    """Read a JSON file, raising :class:`DatasetError` naming it if it is missing or bad."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read annotation file ({exc.strerror or exc})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from exc


_SNIFF_BYTES = 65536


def sniff_json(path: Path) -> Literal["list", "labelme", "object"] | None:
    """Tell a JSON file's kind from its start, without parsing a possibly huge file.

    Returns:
        ``"list"`` for a top-level array (a Label Studio export), ``"labelme"`` for an
        object with LabelMe's ``shapes`` key, ``"object"`` for any other object (COCO),
        ``None`` if the file cannot be read or is not JSON.
    """
    try:
        with path.open("rb") as file:
            head = file.read(_SNIFF_BYTES).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    except OSError:
        return None
    if head.startswith("["):
        return "list"
    if not head.startswith("{"):
        return None
    return "labelme" if '"shapes"' in head else "object"


def read_xml_root(path: Path, tag: str, kind: str) -> ET.Element:
    """Parse an XML annotation file whose root element must be ``<tag>``.

    Raises:
        DatasetError: Naming the file, if it is missing, not XML, or of another kind.
    """
    try:
        root = ET.parse(path).getroot()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read annotation file ({exc.strerror or exc})") from exc
    except ET.ParseError as exc:
        raise DatasetError(f"{path}: malformed XML ({exc})") from exc
    if root.tag != tag:
        raise DatasetError(f"{path}: root element is <{root.tag}>, not {kind}'s <{tag}>")
    return root


def xml_root_tag(path: Path) -> str | None:
    """The root element of an XML file, read from its first element only."""
    try:
        for _, element in ET.iterparse(path, events=("start",)):
            return element.tag
    except (OSError, ET.ParseError):
        return None
    return None


def image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder``, sorted."""
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)


def find_image(candidates: Iterable[Path]) -> Path | None:
    """Return the first existing file among ``candidates``."""
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def image_candidates(folders: Sequence[Path], name: str) -> list[Path]:
    """Paths where an image called ``name`` (with or without suffix) may be."""
    paths = []
    for folder in folders:
        path = folder / name
        paths.append(path)
        if not path.suffix:
            paths.extend(path.with_suffix(suffix) for suffix in IMAGE_SUFFIXES)
    return paths


def header_size(path: Path, where: str) -> tuple[int, int]:
    """Displayed size of an image read from its header, or :class:`DatasetError`."""
    try:
        return displayed_size(path)
    except ImageError as exc:
        raise DatasetError(f"{where}: {exc}") from exc


def missing_image(message: str, strict: bool) -> None:
    """Refuse a missing image when ``strict``, else warn that its annotations are skipped."""
    if strict:
        raise DatasetError(message)
    warn(message + "; its annotations are skipped")
