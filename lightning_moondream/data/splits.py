"""The split policy: which split of a dataset is read, for every format and stage.

Tools name the same split differently: ``val``, ``valid`` (Roboflow), ``validation``
(Hugging Face), ``dev``, ``val2017`` (COCO). A name's *kind* is its lower-cased form
without a trailing year or number, mapped to ``train``, ``val`` or ``test``. Asking for a
split finds the exact name first, else the one available split of the same kind, so
``split="val"`` and ``split="valid"`` pick the same folder.

When no split is named, a stage takes its own kind: ``train`` for training (and for
:func:`~lightning_moondream.data.detect.load_dataset` without a stage); the validation
split, else test, for validation and evaluation; test, else validation, for testing and
prediction. A dataset with a single split uses it everywhere.

Every reader with splits (YOLO, VOC devkits, COCO roots, folders of split folders,
Hugging Face datasets) and the DataModule choose through :func:`choose_split`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from lightning_moondream.data.errors import DatasetError

Stage = Literal["train", "val", "test", "predict"]

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
_STAGE_PREFERENCE: dict[str, tuple[str, ...]] = {
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


def choose_split(
    available: Sequence[str], wanted: str | None, where: str, stage: Stage = "train"
) -> str | None:
    """The split to read: the one named, else the stage's own (see the module docstring).

    Args:
        available: The dataset's split names; empty for a dataset without splits.
        wanted: The split asked for, by any of its names; ``None`` for the stage's own.
        where: The dataset, for messages.
        stage: The stage reading when ``wanted`` is ``None``.

    Returns:
        A name among ``available``, or ``None`` for a dataset without splits.

    Raises:
        DatasetError: Naming ``where`` and its splits, if ``wanted`` matches none or
            several of them, names a split of a dataset without splits, or if none is
            named and several exist, none of the stage's kind.
    """
    if wanted is not None:
        return _match(wanted, available, where)
    if not available:
        return None
    for kind in _STAGE_PREFERENCE[stage]:
        same = [name for name in available if split_kind(name) == kind]
        if len(same) == 1:
            return same[0]
    if len(available) == 1:
        return available[0]
    raise DatasetError(
        f"{where}: no {stage} split among {', '.join(available)}; pass split= to choose one"
    )


def refuse_split(wanted: str | None, where: str) -> None:
    """Refuse a split named for a dataset without splits.

    Raises:
        DatasetError: Naming ``where``, if ``wanted`` is not ``None``.
    """
    choose_split([], wanted, where)


def _match(wanted: str, available: Sequence[str], where: str) -> str:
    if not available:
        raise DatasetError(
            f"{where}: this dataset has no splits (no split folders or files), so split "
            f"{wanted!r} cannot be chosen"
        )
    if wanted in available:
        return wanted
    kind = split_kind(wanted)
    same = [name for name in available if kind is not None and split_kind(name) == kind]
    if len(same) == 1:
        return same[0]
    listed = ", ".join(available)
    if same:
        raise DatasetError(f"{where}: split {wanted!r} is ambiguous among {listed}; name one")
    raise DatasetError(f"{where}: no split {wanted!r}; available: {listed}")
