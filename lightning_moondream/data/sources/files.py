"""Helpers shared by the folder-format readers: reading files and finding images."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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
