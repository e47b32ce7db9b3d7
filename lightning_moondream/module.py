"""``MoondreamRLModule``: a Moondream adapter trained by RL through the tuning API.

The model lives on the service. The module stands for it with one local parameter, and
its optimizer step *is* the remote train step: ``training_step`` samples and scores a
batch, and the optimizer step sends one ``/train_step`` with the groups of every batch
since the last one (accumulated batches, every DDP rank), at the optimizer's learning
rate. So ``max_steps``, ``accumulate_grad_batches``, LR schedulers, ``ModelCheckpoint``,
early stopping and DDP behave as they do for any model.

The module holds Lightning's hooks; a :class:`~lightning_moondream.session.Session`
does the work (the adapter, sampling, train steps, API checkpoints, evaluation).
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from pydantic import SecretStr
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_moondream.api import Adapter, AsyncTuningClient, RolloutsResponse, Settings
from lightning_moondream.api.client import DialectChoice
from lightning_moondream.api.usage import UsageStats
from lightning_moondream.distributed import DEFAULT_TIMEOUT
from lightning_moondream.loggers import cloud_loggers
from lightning_moondream.metrics import SkillMetrics
from lightning_moondream.scoring import RewardSpec, Sample, Scorer
from lightning_moondream.session import (
    CHECKPOINT_KEY,
    AmbiguousTrainStepError,
    ResumeMismatchError,
    ServiceChoice,
    Session,
    SessionOptions,
    StepReport,
    Tally,
    TrainStepFailedError,
)
from lightning_moondream.session.sampling import SAMPLE_ENCODING
from lightning_moondream.session.signal import DEFAULT_FLOOR

# Batches of samples stay on the host: they hold no tensors, and they go to the service.
warnings.filterwarnings(
    "ignore", message=r".*overridden .transfer_batch_to_device.", category=UserWarning
)

__all__ = [
    "CHECKPOINT_KEY",
    "SAMPLE_ENCODING",
    "AmbiguousTrainStepError",
    "MoondreamRLModule",
    "ResumeMismatchError",
    "TrainStepFailedError",
]

_IN_THE_BAR = ("train/reward_mean", "train/skipped_steps")
"""Train metrics shown in the progress bar: what the steps score, and how many sent nothing."""

LRSchedulerFactory = Callable[[Optimizer], LRScheduler]
"""Builds an LR scheduler for the module's optimizer, e.g. ``partial(CosineAnnealingLR, T_max=100)``."""


class MoondreamRLModule(LightningModule):
    """Finetune a Moondream adapter by reinforcement learning, the Lightning way.

    Args:
        name: Name of the adapter to create.
        rank: LoRA rank, 16 or 32.
        adapter_id: Attach to this existing adapter instead of creating one.
        from_checkpoint: Create the adapter from this API checkpoint (``adapter/chk``).
        num_rollouts: Sampled attempts per sample in a training step (2 to 16).
        train_settings: Sampling settings for training (default temperature 1.0).
        eval_settings: Settings for validation, test and predict (default temperature 0,
            greedy, so results do not depend on batching).
        reward: ``None`` for server ground-truth rewards (point, detect) and exact match
            (query); a built-in name (``ground_truth``, ``exact_match``, ``token_f1``,
            ``contains``); a dotted path; ``{name: weight}``; or a callable
            ``reward(sample, rollout) -> float``, sync or async.
        reward_std_eps: Groups whose reward standard deviation is below this teach
            nothing and are not sent.
        max_concurrency: Rollouts requests in flight at once. By default, once the
            service's rate is known (``requests_per_second``, or learnt from its 429s),
            what that rate and the latency call for (rate x latency, plus one); else the
            whole batch (up to 64), so a step's rollouts go out in one wave.
        max_staleness: 0 samples each batch after the previous step is applied
            (on-policy); 1 samples the next batch while the current step is applied.
        api_key: Moondream API key; defaults to ``MOONDREAM_API_KEY``. Never saved.
        base_url: API base URL; defaults to ``MOONDREAM_TUNING_URL`` or Moondream Cloud.
        local_service: Options of the local service, used when neither a key nor a base
            URL is set (e.g. ``{"data_dir": "..."}``; by default it keeps its data under
            the trainer's ``default_root_dir``).
        on_ambiguous_step: What to do when a train step may or may not have been applied
            and the server does not report ``train_steps``: ``raise`` (stop, to resume
            from the last checkpoint) or ``skip`` (count it as applied, warn, never resend).
        max_retries: Retries of failed requests where retrying is safe.
        timeout: Seconds per request; by default 120 s for rollouts, 900 s for steps.
        dialect: The tuning API's wire dialect: ``auto`` (detected without side effects,
            ``/finetunes`` preferred), ``adapters`` or ``finetunes``.
        lr: Learning rate of each train step, carried by the module's optimizer so LR
            schedulers and ``LearningRateMonitor`` apply; ``None`` sends none (the
            service's default). ``/finetunes`` only.
        lr_scheduler: Builds an LR scheduler for the optimizer, stepped after every
            train step (e.g. ``CosineAnnealingLR``); needs ``lr``.
        sft_warmup_steps: The first steps are supervised: each sample's ground truth
            is taught as an SFT group, with no rollouts. ``/finetunes`` only.
        sft_share: Share of each RL step's samples also taught as SFT groups (0 to 1).
        collective_timeout: Seconds a process of a multi-process run waits for the
            others at a collective before the run fails.
        skip_prompts: Skip, ahead of sampling, prompts whose last groups in a row had no
            reward spread, with a chance of 1 - 0.5**k after k such groups (GRESO's
            pre-rollout filtering); logged as ``train/skipped_prompts``.
        skip_floor: The least chance that such a prompt is still sampled, so one that
            would teach again comes back.
        max_extra_requests: Dynamic sampling: per step and process, up to this many more
            requests sample again the batch's prompts that spread, until the step holds
            a group with spread per sample of the batch (0: off).
        resume_at_finetune_step: On ``/finetunes``, let ``fit`` resume a finetune that
            went on past the checkpoint (the run stopped after saving it) from the step
            it stands at, said in the log (a service that does not report a finetune's
            step, as Moondream Cloud, tells it in the first train step's answer); by
            default such a resume stops. Steps are never sent or counted twice.
        requests_per_second: The API key's rate limit (Moondream Cloud: 2, or 10 once
            funded), shared by every process of the run: each sends its equal share, on
            turns of its own. ``None`` learns it from the service's 429 answers. The
            admitted rate and the 429s are logged (``train/admitted_rps``,
            ``train/rate_limited``) and counted in ``usage``.

    ``validate``, ``test`` and ``predict`` given a ``/finetunes`` checkpoint
    (``ckpt_path``, ``"best"``, ``"last"``) answer with its inference model
    ``moondream3-preview/FT@STEP``, read-only: the finetune is not reattached, so it may
    stand at any step.
    """

    def __init__(
        self,
        name: str = "lightning-moondream",
        rank: int = 16,
        adapter_id: str | None = None,
        from_checkpoint: str | None = None,
        num_rollouts: int = 8,
        train_settings: dict[str, Any] | None = None,
        eval_settings: dict[str, Any] | None = None,
        reward: RewardSpec = None,
        reward_std_eps: float = 1e-6,
        max_concurrency: int | None = None,
        max_staleness: int = 0,
        api_key: SecretStr | None = None,
        base_url: str | None = None,
        local_service: dict[str, Any] | None = None,
        on_ambiguous_step: Literal["raise", "skip"] = "raise",
        max_retries: int = 4,
        timeout: float | None = None,
        dialect: DialectChoice = "auto",
        lr: float | None = None,
        lr_scheduler: LRSchedulerFactory | None = None,
        sft_warmup_steps: int = 0,
        sft_share: float = 0.0,
        collective_timeout: float = DEFAULT_TIMEOUT,
        skip_prompts: bool = True,
        skip_floor: float = DEFAULT_FLOOR,
        max_extra_requests: int = 0,
        resume_at_finetune_step: bool = False,
        requests_per_second: float | None = None,
    ) -> None:
        super().__init__()
        ignored = ["api_key", "lr_scheduler"] + (
            [] if reward is None or isinstance(reward, (str, dict)) else ["reward"]
        )
        self.save_hyperparameters(ignore=ignored)
        options = SessionOptions.of(self.hparams)
        service = ServiceChoice.of(self.hparams, api_key)
        if lr_scheduler is not None and lr is None:
            raise ValueError("lr_scheduler needs lr: a schedule scales the module's lr")
        self.lr_scheduler = lr_scheduler
        # Stands for the adapter's weights on the service: DDP, the optimizer and its
        # schedulers need a parameter; its gradient is always zero, so it never moves.
        self.remote_weights = torch.nn.Parameter(torch.zeros(()))
        self.val_metrics = SkillMetrics()
        self.test_metrics = SkillMetrics()
        self.session = Session(
            options,
            service,
            Scorer(reward),
            info=rank_zero_info,
            warn=rank_zero_warn,
            resume_hint=self._resume_hint,
        )
        """Does the work of every hook: the adapter, sampling, train steps, evaluation."""
        self._report: StepReport | None = None
        self._warned_clipping = False

    # What the module stands for ----------------------------------------------------------

    @property
    def uses_local_service(self) -> bool:
        """Whether no key and no base URL are set, so the local service serves."""
        return self.session.connection.uses_local_service

    @property
    def client(self) -> AsyncTuningClient:
        """The API client, connected on first use."""
        return self.session.client

    @property
    def adapter(self) -> Adapter:
        """The adapter, opened on first use (by rank 0, shared with the other ranks)."""
        return self.session.adapter

    @property
    def usage(self) -> UsageStats:
        """API usage: this process's while a stage runs, every process's once fit or test ends."""
        return self.session.usage

    @property
    def train_steps(self) -> int:
        """Train steps the adapter has, as far as this run knows."""
        return self.session.remote.train_steps

    @property
    def skipped_steps(self) -> int:
        """Global steps that applied nothing (``global_step`` = ``train_steps`` + these)."""
        return self.session.remote.skipped_steps

    # Set-up ------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        """The stand-in's optimizer: it carries ``lr`` (and its scheduler) to the service."""
        lr = self.hparams["lr"]
        optimizer = SGD([self.remote_weights], lr=0.0 if lr is None else lr)
        if self.lr_scheduler is None:
            return optimizer
        scheduler = {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def configure_callbacks(self) -> list[Callback]:
        """End a stage that stops on an error as ``teardown`` ends others (Lightning skips it then)."""
        return [_CloseOnException()]

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Say once that clipping is the service's: there are no local gradients."""
        if gradient_clip_val and not self._warned_clipping:
            self._warned_clipping = True
            rank_zero_warn(
                f"gradient_clip_val={gradient_clip_val} has no effect: the adapter's gradients are "
                "computed and clipped on the Moondream service (it reports train/grad_norm)"
            )

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        """Leave batches where they are: samples hold no tensors, and they go to the server."""
        return batch

    def setup(self, stage: str) -> None:
        """Join the run's processes and settle where the local service lives."""
        root = self._trainer.default_root_dir if self._trainer is not None else "."
        self.session.join(root, evaluating_only=stage != "fit")

    # Training ----------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        """Open the adapter (and connect cloud loggers) before the first batch.

        Raises:
            ValueError: If SFT or ``lr`` is asked of a service speaking ``/adapters``.
        """
        self._bind_cloud_loggers()
        self.session.check_training(self.hparams["lr"])

    def training_step(self, batch: Sequence[Sample], batch_idx: int) -> torch.Tensor:
        """Sample and score the batch (or take its SFT targets) for the next train step.

        Returns:
            A zero loss on the stand-in parameter, for Lightning's backward pass.
        """
        self.session.teacher.teach(batch, batch_idx, self.global_step)
        return self.remote_weights * 0.0

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Run the last batch's step, then send one remote train step at the current lr."""
        optimizer.step(closure=optimizer_closure)
        lr = None if self.hparams["lr"] is None else float(optimizer.param_groups[0]["lr"])
        self._report = self.session.step(lr)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log the train step's statistics, the same on every rank."""
        report, self._report = self._report, None
        if report is None:
            return
        metrics = {f"train/{name}": value for name, value in report.metrics.items()}
        shown = {name: metrics.pop(name) for name in _IN_THE_BAR if name in metrics}
        self.log_dict(shown, prog_bar=True, batch_size=1)
        self.log_dict(metrics, batch_size=1)

    def on_train_end(self) -> None:
        """Apply the last pending train step, total the usage, and warn if most steps taught nothing."""
        self.session.drain()
        self.session.total_usage()
        summary = self.session.remote.skipped_summary(self.global_step)
        if summary is not None:
            rank_zero_warn(summary)

    # Validation, test and predict --------------------------------------------------------

    def on_validation_start(self) -> None:
        """Evaluate the adapter with every train step applied (or the checkpoint's model)."""
        self.session.drain()
        self._bind_cloud_loggers()

    # Records, not a loss: callbacks (prediction images) read them in on_*_batch_end.
    def validation_step(self, batch: Sequence[Sample], batch_idx: int) -> list[dict[str, Any]]:  # type: ignore[override]
        """One greedy rollout per sample, scored and added to the epoch's metrics."""
        return self._evaluate_step("val", batch, batch_idx, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        """Compute and log the epoch's metrics (``val/map``, ``val/det_f1``, ...)."""
        self._log_metrics("val", self.val_metrics)

    on_test_start = on_validation_start

    def test_step(self, batch: Sequence[Sample], batch_idx: int) -> list[dict[str, Any]]:  # type: ignore[override]
        """One greedy rollout per sample, scored and added to the test metrics."""
        return self._evaluate_step("test", batch, batch_idx, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        """Compute and log the test metrics, and total the usage of every process."""
        self._log_metrics("test", self.test_metrics)
        self.session.total_usage()

    def on_predict_start(self) -> None:
        """Open the adapter on every rank at once."""
        self.session.adapter  # noqa: B018

    def predict_step(self, batch: Sequence[Sample], batch_idx: int) -> list[dict[str, Any]]:
        """One greedy rollout per sample: ``{"id", "skill", "label", "output"}`` records."""
        return self.session.predict(batch, batch_idx)

    def _evaluate_step(
        self, stage: str, batch: Sequence[Sample], batch_idx: int, metrics: SkillMetrics
    ) -> list[dict[str, Any]]:
        scored = self.session.evaluate_batch(batch, batch_idx, metrics)
        mean = statistics.fmean(item.reward for item in scored)
        self.log(
            f"{stage}/reward", mean, prog_bar=stage == "val", batch_size=len(scored), sync_dist=True
        )
        return [item.record() for item in scored]

    def _log_metrics(self, stage: str, metrics: SkillMetrics) -> None:
        values = metrics.compute()
        metrics.reset()
        # Already totalled over every rank by torchmetrics; synced again only so that
        # Lightning knows every rank holds the same value.
        self.log_dict({f"{stage}/{name}": value for name, value in values.items()}, sync_dist=True)

    # Outside the loops -------------------------------------------------------------------

    def generate(
        self, samples: Sequence[Sample], settings: Settings | None = None
    ) -> list[RolloutsResponse]:
        """One rollout per sample, in order (``eval_settings`` by default, greedy).

        ``response.rollouts[0].output`` is a sample's answer.
        """
        return self.session.generate(samples, settings)

    def evaluate(
        self,
        batches: Iterable[Sequence[Sample]],
        *,
        progress: Callable[[int], None] | None = None,
        tallies: Sequence[Tally] = (),
    ) -> dict[str, float]:
        """Evaluate the adapter outside a ``Trainer`` loop: ``SkillMetrics``, ``reward``, ``samples``.

        Within a multi-process ``Trainer`` run (from a callback, after ``setup``), call
        it on every process, each with its share of the data (as ``MoondreamDataModule``
        gives it): the results cover all of them. ``progress`` is called with the samples
        done after each batch; ``tallies`` keep further scores (e.g. a ``BenchmarkTally``).
        """
        return self.session.evaluate(batches, progress=progress, tallies=tallies)

    def send_metrics(self, step: int, metrics: Mapping[str, float]) -> Future[int]:
        """Start logging ``metrics`` at ``step`` to the finetune; a future of how many were stored."""
        return self.session.send_metrics(step, metrics)

    def delete_api_checkpoint(self, checkpoint_id: str) -> None:
        """Delete an API checkpoint (used when its Lightning checkpoint is removed)."""
        self.session.delete_checkpoint(checkpoint_id)

    def close(self, wait: bool = True) -> None:
        """Close the client, its loop and a local service this process serves.

        ``wait=False`` abandons a train step in flight (see ``Session.close``).
        """
        self.session.close(wait)

    # Checkpoints and the end of a stage --------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save one API checkpoint (on rank 0) and record its ids (never the key).

        Raises:
            AmbiguousTrainStepError: If the last train step may or may not have been
                applied: no checkpoint can then pair ``global_step`` with the adapter's
                state, so none is written (resume from an earlier one).
        """
        trainer = self._trainer
        # A stage stopping on an error closed the module before checkpoint callbacks
        # (OnExceptionCheckpoint) ran: the session saves on rank 0 alone, then closes.
        interrupted = trainer is not None and trainer.state.status == TrainerStatus.INTERRUPTED
        state = self.session.save_checkpoint(interrupted)
        if state is not None:
            checkpoint[CHECKPOINT_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Continue from the checkpoint's API state when the adapter is next opened."""
        # Checkpoints of versions without the stand-in load as if it were there.
        checkpoint.get("state_dict", {}).setdefault("remote_weights", torch.zeros(()))
        state = checkpoint.get(CHECKPOINT_KEY)
        if not state:
            rank_zero_warn("the checkpoint has no Moondream state; starting a fresh adapter")
            return
        self.session.resume(state)

    def teardown(self, stage: str) -> None:
        """Close the connection; a later stage reconnects.

        The adapter stays, unless it was made for this validate, test or predict stage
        alone (from a checkpoint, or fresh for the base model): then it is deleted.
        """
        self.session.drain()
        self.session.collective.barrier()
        self._release()

    def _release(self, wait: bool = True) -> None:
        try:
            for logger in cloud_loggers(self._trainer):
                logger.release()
        finally:
            self.session.release(wait)

    def _bind_cloud_loggers(self) -> None:
        adapter_id = self.session.adapter.adapter_id
        if self.session.collective.is_zero:
            for logger in cloud_loggers(self._trainer):
                logger.bind(self, adapter_id)

    def _resume_hint(self) -> str:
        callback = self._trainer.checkpoint_callback if self._trainer is not None else None
        saved = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        return f"ckpt_path={saved!r}" if saved else "ckpt_path=<your last checkpoint>.ckpt"


class _CloseOnException(Callback):
    """Ends a failed stage as ``teardown`` ends a finished one (Lightning skips it then)."""

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Delete a temporary adapter and close the connection, keeping the original error.

        After Ctrl-C a pending train step is not waited for: it may take minutes.
        """
        if not isinstance(pl_module, MoondreamRLModule):
            return
        try:
            pl_module._release(wait=not isinstance(exception, KeyboardInterrupt))
        except Exception as exc:
            rank_zero_warn(f"closing the Moondream client after {type(exception).__name__}: {exc}")
