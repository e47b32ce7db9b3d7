"""``CloudMetricsLogger``: logged metrics forwarded to the finetune on Moondream Cloud.

Metrics posted to ``/finetunes/{id}/metrics`` show in the cloud dashboard next to the
finetune. The logger works beside any other (TensorBoard, CSV): Lightning gives every
logger the same values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

from lightning.pytorch import Trainer
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lightning_moondream.api import UnsupportedFeatureError

__all__ = ["CloudMetricsLogger", "MetricsSink", "cloud_loggers"]


class MetricsSink(Protocol):
    """Where the logger sends metrics: the ``MoondreamRLModule`` of the run."""

    def send_metrics(self, step: int, metrics: Mapping[str, float]) -> Future[Any]:
        """Start sending ``metrics`` of ``step``; the future completes when they are stored."""
        ...


class CloudMetricsLogger(Logger):
    """Forward logged metrics to ``/finetunes/{id}/metrics`` of the run's finetune.

    Add it to the trainer's loggers; the ``MoondreamRLModule`` connects it to its
    finetune when a stage starts. Metrics go out in the background, so training never
    waits for them; they are all sent before the stage ends. Values that are not finite
    numbers are left out (the API refuses them), with one warning per name. On a service
    that speaks only ``/adapters``, which keeps no metrics, it warns once and sends nothing.

    Args:
        include: Prefixes of the metric names to send (e.g. ``["train/", "val/"]``);
            ``None`` sends every metric but Lightning's ``epoch`` counter.

    Example:
        >>> trainer = Trainer(logger=[TensorBoardLogger("runs"), CloudMetricsLogger()])  # doctest: +SKIP
    """

    def __init__(self, include: Sequence[str] | None = None) -> None:
        super().__init__()
        self.include = None if include is None else tuple(include)
        self._sink: MetricsSink | None = None
        self._finetune_id: str | None = None
        self._waiting: list[tuple[int, dict[str, float]]] = []
        self._in_flight: list[Future[Any]] = []
        self._disabled = False
        self._warned_names: set[str] = set()

    @property
    def name(self) -> str:
        """Name of the logger."""
        return "moondream"

    @property
    def version(self) -> str | None:
        """The finetune the metrics go to, once known."""
        return self._finetune_id

    def bind(self, sink: MetricsSink, finetune_id: str) -> None:
        """Send to ``sink`` from now on, and what was logged before it was known."""
        self._sink, self._finetune_id = sink, finetune_id
        waiting, self._waiting = self._waiting, []
        for step, metrics in waiting:
            self._send(step, metrics)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Hyperparameters have no place in the API: nothing is sent."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Queue the chosen, finite metrics of ``step`` for the finetune."""
        chosen = {name: float(value) for name, value in metrics.items() if self._chosen(name)}
        for name in [name for name, value in chosen.items() if not math.isfinite(value)]:
            del chosen[name]
            if name not in self._warned_names:
                self._warned_names.add(name)
                rank_zero_warn(f"CloudMetricsLogger leaves out {name}: its value is not finite")
        if not chosen or self._disabled:
            return
        if self._sink is None:
            self._waiting.append((step or 0, chosen))
            return
        self._send(step or 0, chosen)

    def _chosen(self, name: str) -> bool:
        if self.include is None:
            return name != "epoch"
        return name.startswith(self.include)

    def _send(self, step: int, metrics: dict[str, float]) -> None:
        assert self._sink is not None
        self._in_flight.append(self._sink.send_metrics(step, metrics))
        self._reap(wait=False)

    def _reap(self, wait: bool) -> None:
        """Look at the sends that finished (or all, waiting), warning about failures."""
        still = []
        for future in self._in_flight:
            if not wait and not future.done():
                still.append(future)
                continue
            error = future.exception()
            if isinstance(error, UnsupportedFeatureError):
                if not self._disabled:
                    self._disabled = True
                    rank_zero_warn(f"CloudMetricsLogger sends nothing: {error}")
            elif error is not None:
                # Metrics are not worth a run: the run goes on, and says what was lost.
                rank_zero_warn(f"CloudMetricsLogger could not send metrics: {error}")
        self._in_flight = still

    def flush(self) -> None:
        """Wait until every metric sent so far is stored (or has failed, with a warning)."""
        self._reap(wait=True)

    def release(self) -> None:
        """Send what is in flight and let go of the sink; later metrics wait for the next."""
        try:
            self.flush()
        finally:
            self._sink = None

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Wait for what is in flight."""
        self.flush()


def cloud_loggers(trainer: Trainer | None) -> list[CloudMetricsLogger]:
    """The trainer's ``CloudMetricsLogger`` instances (none without a trainer)."""
    loggers = trainer.loggers if trainer is not None else []
    return [logger for logger in loggers if isinstance(logger, CloudMetricsLogger)]
