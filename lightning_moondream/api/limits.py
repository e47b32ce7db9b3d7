"""The API's limits and defaults, in one place for the client and the local service.

Both sides import these, so what the client refuses before sending is exactly what the
local service refuses on arrival. Values follow Moondream's API reference where it
states them, and the ``/adapters`` spec for that dialect.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

ADAPTER_RANKS: Final = (16, 32)
"""LoRA ranks the ``/adapters`` dialect accepts."""

FINETUNE_RANKS: Final = (8, 16, 24, 32)
"""LoRA ranks the ``/finetunes`` dialect accepts (Moondream's quickstart uses 8)."""

MIN_ROLLOUTS: Final = 1
MAX_ROLLOUTS: Final = 16
"""Rollouts one ``/rollouts`` request may ask for."""

MAX_SPATIAL_REFS: Final = 64
"""Points or boxes one request may refer to in ``spatial_refs``."""

MIN_PAGE_SIZE: Final = 1
MAX_PAGE_SIZE: Final = 100
DEFAULT_PAGE_SIZE: Final = 20
"""Bounds and default of ``limit`` on listing endpoints."""

DEFAULT_TEMPERATURE: Final = 1.0
DEFAULT_TOP_P: Final = 1.0
DEFAULT_MAX_TOKENS: Final = MappingProxyType({"query": 128, "point": 128, "detect": 256})
"""``max_tokens`` of a request that sets none, per skill."""

DEFAULT_MAX_OBJECTS: Final = 50
"""``max_objects`` of a detect request that sets none."""

RATE_LIMIT_HEADER: Final = "X-Rate-Limit"
NO_RATE_LIMIT: Final = "none"
"""A header the local service sends when it sets no rate limit, and its value: the
client then paces nothing (Moondream Cloud says nothing, and is limited)."""
