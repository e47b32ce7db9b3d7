"""What a session is asked to do: its options, each checked with a clear error."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from lightning_moondream.api import Settings
from lightning_moondream.api.limits import FINETUNE_RANKS
from lightning_moondream.distributed import DEFAULT_TIMEOUT
from lightning_moondream.session.signal import DEFAULT_FLOOR

_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "rank": (
        lambda value: value in FINETUNE_RANKS,
        "must be 8, 16, 24 or 32 (8 and 24 on /finetunes only)",
    ),
    "num_rollouts": (lambda value: 2 <= value <= 16, "must be from 2 to 16"),
    "max_retries": (lambda value: value >= 0, "must be 0 or more"),
    "max_staleness": (lambda value: value in (0, 1), "must be 0 or 1"),
    "max_concurrency": (lambda value: value is None or value >= 1, "must be at least 1"),
    "on_ambiguous_step": (lambda value: value in ("raise", "skip"), "must be 'raise' or 'skip'"),
    "lr": (
        lambda value: value is None or (math.isfinite(value) and value >= 0),
        "must be a finite number >= 0, or None for the service's default",
    ),
    "sft_warmup_steps": (lambda value: value >= 0, "must be 0 or more"),
    "sft_share": (lambda value: 0.0 <= value <= 1.0, "must be from 0 to 1"),
    "collective_timeout": (lambda value: value > 0, "must be a positive number of seconds"),
    "skip_floor": (lambda value: 0.0 <= value <= 1.0, "must be from 0 to 1"),
    "max_extra_requests": (lambda value: value >= 0, "must be 0 or more"),
    "requests_per_second": (
        lambda value: value is None or (math.isfinite(value) and value > 0),
        "must be a finite number > 0 (the key's requests per second), or None to learn it",
    ),
}

_REASONS = {
    "num_rollouts": ": training learns from the differences between the rollouts of a sample",
}


def _settings(value: Settings | Mapping[str, Any] | None, temperature: float) -> Settings:
    if isinstance(value, Settings):
        return value
    return Settings.model_validate({"temperature": temperature, **dict(value or {})})


@dataclass(frozen=True)
class SessionOptions:
    """A session's options; ``MoondreamRLModule``'s arguments of the same names.

    Settings given as mappings become ``Settings``: training samples at temperature 1
    and evaluation is greedy (temperature 0) unless they say otherwise.

    Raises:
        ValueError: For an option that cannot work, naming it and what it takes.
    """

    name: str = "lightning-moondream"
    rank: int = 16
    adapter_id: str | None = None
    from_checkpoint: str | None = None
    num_rollouts: int = 8
    train_settings: Settings | Mapping[str, Any] | None = None
    eval_settings: Settings | Mapping[str, Any] | None = None
    reward_std_eps: float = 1e-6
    max_concurrency: int | None = None
    max_staleness: int = 0
    on_ambiguous_step: Literal["raise", "skip"] = "raise"
    max_retries: int = 4
    lr: float | None = None
    sft_warmup_steps: int = 0
    sft_share: float = 0.0
    collective_timeout: float = DEFAULT_TIMEOUT
    skip_prompts: bool = True
    skip_floor: float = DEFAULT_FLOOR
    max_extra_requests: int = 0
    resume_at_finetune_step: bool = False
    requests_per_second: float | None = None

    def __post_init__(self) -> None:
        for name, (valid, expected) in _RULES.items():
            value = getattr(self, name)
            if not valid(value):
                raise ValueError(f"{name} {expected}, got {value!r}{_REASONS.get(name, '')}")
        object.__setattr__(self, "train_settings", _settings(self.train_settings, 1.0))
        object.__setattr__(self, "eval_settings", _settings(self.eval_settings, 0.0))

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> SessionOptions:
        """The options among ``values`` (e.g. a module's hyperparameters); others are left."""
        names = {field.name for field in fields(cls)}
        return cls(**{name: value for name, value in values.items() if name in names})

    @property
    def training(self) -> Settings:
        """Sampling settings of training."""
        assert isinstance(self.train_settings, Settings)
        return self.train_settings

    @property
    def evaluation(self) -> Settings:
        """Settings of validation, test and predict."""
        assert isinstance(self.eval_settings, Settings)
        return self.eval_settings
