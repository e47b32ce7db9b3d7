"""The tuning API clients and their configuration, under one import path.

``TuningClient`` (``sync_client``) and ``AsyncTuningClient`` (``async_client``) drive
the same plans (``plans``) over the same core (``core``); this module gathers the names
callers import.
"""

from lightning_moondream.api.async_client import (
    AsyncAdapters,
    AsyncCheckpoints,
    AsyncMetrics,
    AsyncTuningClient,
)
from lightning_moondream.api.core import (
    DEFAULT_BASE_URL,
    LOCAL_API_KEY,
    LOCAL_BASE_URL,
    resolve_api_key,
    resolve_base_url,
)
from lightning_moondream.api.plans import DialectChoice, RolloutCall, check_dialect
from lightning_moondream.api.sync_client import Adapters, Checkpoints, Metrics, TuningClient

__all__ = [
    "DEFAULT_BASE_URL",
    "LOCAL_API_KEY",
    "LOCAL_BASE_URL",
    "Adapters",
    "AsyncAdapters",
    "AsyncCheckpoints",
    "AsyncMetrics",
    "AsyncTuningClient",
    "Checkpoints",
    "DialectChoice",
    "Metrics",
    "RolloutCall",
    "TuningClient",
    "check_dialect",
    "resolve_api_key",
    "resolve_base_url",
]
