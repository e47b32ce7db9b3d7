"""Injected latency and failures, for benchmarks and for testing clients' retry logic.

Off by default. Endpoints are grouped under five names: ``"adapters"`` (create, list,
get, delete adapters or finetunes, and a finetune's metrics), ``"checkpoints"`` (save,
list, delete checkpoints), ``"rollouts"``, ``"train_step"`` and ``"inference"`` (the
inference API's ``/v1/query``, ``/detect``, ``/point`` and ``/caption``); both tuning
API dialects map to the same groups.

Failures drawn by ``FaultInjector.before`` are answered before the request reaches its
handler, so they never change state: a client may safely retry any of them. The
``after_train_step`` mode is the opposite on purpose: the step IS applied, then the
answer is an error or a dropped connection, which is the ambiguous case a client must
resolve without applying the step twice.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from lightning_moondream.server.http_common import INFERENCE_PATHS, PREFIX

ENDPOINTS: tuple[str, ...] = ("adapters", "checkpoints", "rollouts", "train_step", "inference")
FAULT_KINDS: tuple[str, ...] = ("429", "503", "500", "drop")
AFTER_APPLY_KINDS: tuple[str, ...] = ("500", "drop")

_CHECKPOINTS = re.compile(rf"{PREFIX}/(adapters|finetunes)/[^/]+/checkpoints?(/.*)?")
_ADAPTERS = re.compile(rf"{PREFIX}/(adapters(/[^/]+)?|finetunes(/[^/]+(/metrics)?)?)")


class DroppedConnection(Exception):
    """Raised by the app to drop a connection without a complete response.

    Under uvicorn the connection is closed mid-response; an in-process transport sees
    the exception itself.
    """


def endpoint_of(path: str) -> str | None:
    """The endpoint group of a request path, or ``None`` outside the API."""
    if path in (f"{PREFIX}/rollouts", f"{PREFIX}/train_step"):
        return path.rsplit("/", 1)[1]
    if path in INFERENCE_PATHS:
        return "inference"
    if _CHECKPOINTS.fullmatch(path):
        return "checkpoints"
    if _ADAPTERS.fullmatch(path):
        return "adapters"
    return None


def check_latency(latency: Mapping[str, float] | None) -> dict[str, float]:
    """Validate per-endpoint latency (least seconds to answer).

    Raises:
        ValueError: For an unknown endpoint name or a negative delay.
    """
    checked: dict[str, float] = {}
    for name, seconds in (latency or {}).items():
        if name not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {name!r} in latency; use {', '.join(ENDPOINTS)}")
        if not seconds >= 0:
            raise ValueError(f"latency of {name} must be a non-negative number of seconds")
        checked[name] = float(seconds)
    return checked


@dataclass(frozen=True)
class FaultConfig:
    """Which failures to inject.

    Attributes:
        rate: Fraction of requests (to ``endpoints``) answered with a failure before
            anything happens.
        kinds: Failures drawn from, uniformly: ``"429"`` (with ``Retry-After``),
            ``"503"``, ``"500"``, ``"drop"`` (connection dropped).
        endpoints: Endpoint groups the ``rate`` applies to.
        retry_after: Seconds sent in ``Retry-After`` with a 429.
        after_train_step: ``"500"`` or ``"drop"`` to fail ``/train_step`` AFTER the step
            was applied; ``None`` for never.
        after_train_step_rate: Fraction of applied train steps failed that way.
        seed: Seed of the draws, so a run's failures can be reproduced.
    """

    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    endpoints: tuple[str, ...] = ENDPOINTS
    retry_after: int = 1
    after_train_step: str | None = None
    after_train_step_rate: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0 or not 0.0 <= self.after_train_step_rate <= 1.0:
            raise ValueError("fault rates must be between 0 and 1")
        if not self.kinds or any(kind not in FAULT_KINDS for kind in self.kinds):
            raise ValueError(f"fault kinds must be among {', '.join(FAULT_KINDS)}")
        if any(endpoint not in ENDPOINTS for endpoint in self.endpoints):
            raise ValueError(f"fault endpoints must be among {', '.join(ENDPOINTS)}")
        if self.after_train_step is not None and self.after_train_step not in AFTER_APPLY_KINDS:
            raise ValueError(
                f"after_train_step must be one of {', '.join(AFTER_APPLY_KINDS)} or None"
            )
        if self.retry_after < 0:
            raise ValueError("retry_after must be a non-negative number of seconds")


class FaultInjector:
    """Seeded draws of the failures a ``FaultConfig`` asks for; thread-safe."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self._random = random.Random(config.seed)
        self._lock = threading.Lock()

    def before(self, endpoint: str) -> str | None:
        """The failure to answer a request to ``endpoint`` with, or ``None``."""
        config = self.config
        if config.rate == 0.0 or endpoint not in config.endpoints:
            return None
        with self._lock:
            if self._random.random() >= config.rate:
                return None
            return self._random.choice(config.kinds)

    def after_train_step(self) -> str | None:
        """The failure to answer an applied train step with, or ``None``."""
        config = self.config
        if config.after_train_step is None:
            return None
        with self._lock:
            if self._random.random() >= config.after_train_step_rate:
                return None
        return config.after_train_step
