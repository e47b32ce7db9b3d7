"""``UsageSummary``: API usage (requests, rollouts, bytes, latency) in the logs and a table."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override


@runtime_checkable
class UsageSource(Protocol):
    """Anything that reports usage counters, like the client's ``UsageStats``."""

    def snapshot(self) -> dict[str, float | int]:
        """Counters and latency percentiles by name (``requests``, ``latency_p50_s``, ...)."""
        ...


def format_usage(snapshot: dict[str, float | int], title: str = "Moondream API usage") -> str:
    """Render a snapshot as a two-column text table.

    Counts are printed with thousands separators, ``bytes_sent`` also in MiB, and
    latencies (names ending in ``_s``) in seconds with three decimals. An
    ``admitted_rate`` of 0 (nothing limited the requests: no rate set or learnt yet) is a
    dash.
    """
    rows = []
    for name, value in snapshot.items():
        if name == "admitted_rate" and not value:
            text = "-"
        elif name.endswith("_s"):
            text = f"{float(value):.3f} s"
        elif name == "bytes_sent":
            text = f"{int(value):,} ({int(value) / 2**20:.1f} MiB)"
        elif isinstance(value, float) and not value.is_integer():
            text = f"{value:,.3f}"
        else:
            text = f"{int(value):,}"
        rows.append((name, text))
    name_width = max([len(name) for name, _ in rows] + [len("metric")])
    value_width = max([len(text) for _, text in rows] + [len("value")])
    rule = "-" * (name_width + value_width + 3)
    lines = [title, rule, f"{'metric':<{name_width}}   {'value':>{value_width}}", rule]
    lines += [f"{name:<{name_width}}   {text:>{value_width}}" for name, text in rows]
    lines.append(rule)
    return "\n".join(lines)


class UsageSummary(Callback):
    """Log the module's API usage and print a summary table when fitting or testing ends.

    The LightningModule must expose ``usage``, a :class:`UsageSource`. Its numbers are
    logged as ``usage/<name>`` (``usage/requests``, ``usage/latency_p95_s``, ...) at the
    end of every training epoch and of every validation, and printed as a table at the
    end of ``fit`` and ``test``.

    Counters are cumulative since the module was made. What they cover is the module's
    ``usage`` to say; ``MoondreamRLModule``'s are rank zero's own in the logs during a
    stage, and every process's in the tables printed when ``fit`` or ``test`` ends.
    Among them, ``rate_limited`` counts 429 answers and ``admitted_rate`` is the rate
    (requests per second) the rate limiter admits, summed over processes: the key's.

    Raises:
        TypeError: At setup, if the module has no ``usage`` with a ``snapshot()`` method.
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._snapshot(pl_module)

    def _snapshot(self, pl_module: pl.LightningModule) -> dict[str, float | int]:
        # Read at each use: a module may total its usage over processes at a stage's end.
        usage = getattr(pl_module, "usage", None)
        if not isinstance(usage, UsageSource):
            raise TypeError(
                f"UsageSummary needs the LightningModule to have a `usage` attribute with a "
                f"snapshot() method; {type(pl_module).__name__} has none"
            )
        return usage.snapshot()

    @rank_zero_only
    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Straight to the loggers: `self.log` is not allowed in `on_validation_end`, and
        # these per-process totals must not be averaged over ranks as `self.log` would.
        snapshot = self._snapshot(pl_module)
        metrics = {f"usage/{name}": float(value) for name, value in snapshot.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @rank_zero_only
    def _print(self, pl_module: pl.LightningModule, title: str) -> None:
        print(format_usage(self._snapshot(pl_module), title))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(pl_module, "Moondream API usage (fit)")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(pl_module, "Moondream API usage (test)")
