"""Finetune Moondream by reinforcement learning from PyTorch Lightning.

``MoondreamRLModule`` and ``MoondreamDataModule`` load on first access, so that the
client (``lightning_moondream.api``) and the local service (``lightning_moondream.server``)
import without Lightning.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "MoondreamRLModule": "lightning_moondream.module",
    "MoondreamDataModule": "lightning_moondream.data.module",
}

__all__ = ["MoondreamDataModule", "MoondreamRLModule", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_moondream' has no attribute {name!r}")
