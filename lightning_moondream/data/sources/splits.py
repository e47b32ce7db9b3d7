"""Split names as exports write them, and the choice of a split when none is named.

Tools name the same split differently: ``val``, ``valid`` (Roboflow), ``validation``
(Hugging Face), ``val2017`` (COCO). A name's *kind* is its lower-cased form without a
trailing year or number, mapped to ``train``, ``val`` or ``test``; asking for a split
finds the exact name first, else the one available split of the same kind, so
``split="val"`` and ``split="valid"`` pick the same folder.

When no split is named, a stage takes its own kind: ``train`` for training; the
validation split, else test, for validation and evaluation; test, else validation, for
testing; and a dataset with a single split uses it everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from lightning_moondream.data.errors import DatasetError

_KINDS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
_STAGE_PREFERENCE = {
    "train": ("train",),
    "val": ("val", "test"),
    "test": ("test", "val"),
    "predict": ("test", "val"),
}


def split_kind(name: str) -> str | None:
    """``train``, ``val`` or ``test`` for a split name such as ``valid`` or ``val2017``."""
    return _KINDS.get(re.sub(r"[\d_-]+$", "", name.lower()))


def split_folders(root: Path) -> dict[str, Path]:
    """The subfolders of ``root`` named like splits (``train/``, ``valid/``, ...), by name."""
    if not root.is_dir():
        return {}
    return {
        path.name: path
        for path in sorted(root.iterdir())
        if path.is_dir() and split_kind(path.name) is not None
    }


def match_split(wanted: str, available: Sequence[str], where: str) -> str:
    """The available split meant by ``wanted``: the same name, else the same kind.

    Raises:
        DatasetError: Naming ``where`` and the splits there, if none or several match.
    """
    if wanted in available:
        return wanted
    kind = split_kind(wanted)
    same = [name for name in available if kind is not None and split_kind(name) == kind]
    if len(same) == 1:
        return same[0]
    listed = ", ".join(available) or "none"
    if same:
        raise DatasetError(f"{where}: split {wanted!r} is ambiguous among {listed}; name one")
    raise DatasetError(f"{where}: no split {wanted!r}; available: {listed}")


def default_split(available: Sequence[str], stage: str, where: str) -> str | None:
    """The split a stage uses when none is named (see the module docstring).

    Args:
        available: The dataset's split names; empty for a dataset without splits.
        stage: ``train``, ``val``, ``test`` or ``predict``.
        where: The dataset, for messages.

    Returns:
        The split, or ``None`` for a dataset without splits.

    Raises:
        DatasetError: If several splits exist and none is of the stage's kind.
    """
    if not available:
        return None
    for kind in _STAGE_PREFERENCE.get(stage, (stage,)):
        same = [name for name in available if split_kind(name) == kind]
        if len(same) == 1:
            return same[0]
    if len(available) == 1:
        return available[0]
    raise DatasetError(
        f"{where}: no {stage} split among {', '.join(available)}; pass split= to choose one"
    )
