"""``MoondreamRLModule``: a Moondream adapter trained by RL through the tuning API.

The model lives on the service. The module stands for it with one local parameter, and
its optimizer step *is* the remote train step: ``training_step`` samples and scores a
batch, and the optimizer step sends one ``/train_step`` with the groups of every batch
since the last one (accumulated batches, every DDP rank), at the optimizer's learning
rate. So ``max_steps``, ``accumulate_grad_batches``, LR schedulers, ``ModelCheckpoint``,
early stopping and DDP behave as they do for any model.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from pydantic import SecretStr
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_moondream.api import (
    Adapter,
    AsyncTuningClient,
    RolloutCall,
    RolloutsResponse,
    Settings,
    TuningAPIError,
    UsageStats,
)
from lightning_moondream.api.client import DialectChoice, check_dialect
from lightning_moondream.connection import Connection
from lightning_moondream.data.encoding import DEFAULT_MAX_SIDE, DEFAULT_QUALITY
from lightning_moondream.distributed import DEFAULT_TIMEOUT, Collective
from lightning_moondream.images import EncodingOptions
from lightning_moondream.loggers import CloudMetricsLogger
from lightning_moondream.metrics import SkillMetrics
from lightning_moondream.remote_step import (
    AmbiguousTrainStepError,
    RemoteStep,
    Shard,
    StepReport,
    TrainStepFailedError,
    spread,
)
from lightning_moondream.scoring import RewardSpec, Sample, Scorer, sample_and_score

# Batches of samples stay on the host: they hold no tensors, and they go to the service.
warnings.filterwarnings(
    "ignore", message=r".*overridden .transfer_batch_to_device.", category=UserWarning
)

__all__ = [
    "CHECKPOINT_KEY",
    "AmbiguousTrainStepError",
    "MoondreamRLModule",
    "ResumeMismatchError",
    "TrainStepFailedError",
]

MAX_DEFAULT_CONCURRENCY = 64
"""Most rollouts requests in flight by default: the whole batch, up to this many."""

SAMPLE_ENCODING = EncodingOptions(max_side=DEFAULT_MAX_SIDE, quality=DEFAULT_QUALITY)
"""How a sample that reaches the module unencoded is encoded: as ``MoondreamDataModule``
encodes by default, so a user's own DataLoader of paths or PIL images sends the same bytes."""

CHECKPOINT_KEY = "moondream"
"""Key of the API state (adapter and checkpoint ids, never the key) in Lightning checkpoints."""

LRSchedulerFactory = Callable[[Optimizer], LRScheduler]
"""Builds an LR scheduler for the module's optimizer, e.g. ``partial(CosineAnnealingLR, T_max=100)``."""


class ResumeMismatchError(RuntimeError):
    """A finetune is no longer at the step of the checkpoint a run resumes from."""


def _settings(value: Settings | Mapping[str, Any] | None, **defaults: Any) -> Settings:
    if isinstance(value, Settings):
        return value
    return Settings.model_validate({**defaults, **dict(value or {})})


class MoondreamRLModule(LightningModule):
    """Finetune a Moondream adapter by reinforcement learning, the Lightning way.

    Args:
        name: Name of the adapter to create.
        rank: LoRA rank, 16 or 32.
        adapter_id: Attach to this existing adapter instead of creating one.
        from_checkpoint: Create the adapter from this API checkpoint (``adapter/chk``).
        num_rollouts: Sampled attempts per sample in a training step (1 to 16).
        train_settings: Sampling settings for training (default temperature 1.0).
        eval_settings: Settings for validation, test and predict (default temperature 0,
            greedy, so results do not depend on batching).
        reward: ``None`` for server ground-truth rewards (point, detect) and exact match
            (query); a built-in name (``ground_truth``, ``exact_match``, ``token_f1``,
            ``contains``); a dotted path; ``{name: weight}``; or a callable
            ``reward(sample, rollout) -> float``, sync or async.
        reward_std_eps: Groups whose reward standard deviation is below this teach
            nothing and are not sent.
        max_concurrency: Rollouts requests in flight at once; by default the whole batch
            (up to 64), so a step's rollouts go out in one wave.
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
    ) -> None:
        super().__init__()
        _check_arguments(
            rank=rank,
            num_rollouts=num_rollouts,
            max_retries=max_retries,
            max_staleness=max_staleness,
            max_concurrency=max_concurrency,
            on_ambiguous_step=on_ambiguous_step,
            lr=lr,
            sft_warmup_steps=sft_warmup_steps,
            sft_share=sft_share,
            collective_timeout=collective_timeout,
        )
        check_dialect(dialect)
        if lr_scheduler is not None and lr is None:
            raise ValueError("lr_scheduler needs lr: a schedule scales the module's lr")
        ignored = ["api_key", "lr_scheduler"] + (
            [] if reward is None or isinstance(reward, (str, dict)) else ["reward"]
        )
        self.save_hyperparameters(ignore=ignored)
        # Stands for the adapter's weights on the service: DDP, the optimizer and its
        # schedulers need a parameter; its gradient is always zero, so it never moves.
        self.remote_weights = torch.nn.Parameter(torch.zeros(()))
        self.name = name
        self.rank = rank
        self.adapter_id = adapter_id
        self.from_checkpoint = from_checkpoint
        self.num_rollouts = num_rollouts
        self.reward_std_eps = reward_std_eps
        self.max_concurrency = max_concurrency
        self.max_staleness = max_staleness
        self.on_ambiguous_step = on_ambiguous_step
        self.dialect = dialect
        self.lr = lr
        self.lr_scheduler = lr_scheduler
        self.sft_warmup_steps = sft_warmup_steps
        self.sft_share = sft_share
        self.collective_timeout = collective_timeout
        self.train_settings = _settings(train_settings, temperature=1.0)
        self.eval_settings = _settings(eval_settings, temperature=0.0)
        self.scorer = Scorer(reward)
        self.val_metrics = SkillMetrics()
        self.test_metrics = SkillMetrics()
        self._connection = Connection(
            api_key=api_key
            if isinstance(api_key, SecretStr) or api_key is None
            else SecretStr(api_key),
            base_url=base_url,
            local_service=dict(local_service or {}),
            dialect=dialect,
            max_retries=max_retries,
            timeout=timeout,
            usage=UsageStats(),
        )
        self._collective = Collective()
        self._remote = RemoteStep(
            self._connection,
            self._collective,
            max_staleness=max_staleness,
            max_retries=max_retries,
            on_ambiguous_step=on_ambiguous_step,
            resume_hint=self._resume_hint,
        )
        self._adapter: Adapter | None = None
        self._resume_state: dict[str, Any] | None = None
        self._temporary_adapter = False
        self._adapter_created = False
        self._report: StepReport | None = None
        self._run_usage: UsageStats | None = None
        self._warned_clipping = False
        self.last_saved_checkpoint_id: str | None = None
        """Id of the API checkpoint saved with the most recent Lightning checkpoint."""

    # Connection ----------------------------------------------------------------------------

    @property
    def uses_local_service(self) -> bool:
        """Whether no key and no base URL are set, so the local service serves."""
        return self._connection.uses_local_service

    @property
    def client(self) -> AsyncTuningClient:
        """The API client, connected on first use."""
        return self._connection.client

    @property
    def usage(self) -> UsageStats:
        """Counts of requests, rollouts, train steps, retries, bytes and latencies.

        Kept across reconnections (fit, then validate or test). In a multi-process run,
        they cover every process once ``fit`` has trained or ``test`` has tested.
        """
        return self._run_usage or self._connection.usage

    @property
    def train_steps(self) -> int:
        """Train steps the adapter has, as far as this run knows."""
        return self._remote.train_steps

    @property
    def skipped_steps(self) -> int:
        """Global steps that applied nothing: no group had signal, or the lr was 0.

        With them, ``global_step`` equals ``train_steps`` counted since the adapter was
        opened plus ``skipped_steps``.
        """
        return self._remote.skipped_steps

    @property
    def adapter(self) -> Adapter:
        """The adapter being trained or evaluated, created or attached on first use.

        Rank 0 of a multi-process run opens it and shares it; no other rank creates one.
        """
        if self._adapter is None:
            adapter, created, dialect = self._collective.on_zero(self._open_on_zero)
            self._connection.dialect = dialect
            self._adapter, self._adapter_created = adapter, created
            self._remote.reset(
                adapter.train_steps or 0, (self._resume_state or {}).get("skipped_steps", 0)
            )
            stage = self._trainer.state.fn if self._trainer is not None else None
            # An adapter made only to validate, test or predict is removed with the stage.
            self._temporary_adapter = created and stage in (
                TrainerFn.VALIDATING,
                TrainerFn.TESTING,
                TrainerFn.PREDICTING,
            )
            rank_zero_info(
                f"Moondream adapter {adapter.adapter_id} (rank {adapter.rank}, {dialect} dialect)"
                + (
                    f" from checkpoint {self._resume_state['checkpoint_id']}"
                    if self._resume_state
                    else ""
                )
            )
        return self._adapter

    def _open_on_zero(self) -> tuple[Adapter, bool, DialectChoice]:
        adapter, created = self._connection.run(self._open_adapter())
        # Opening an adapter settles an ``auto`` dialect.
        return adapter, created, self._connection.client.dialect or self.dialect

    async def _open_adapter(self) -> tuple[Adapter, bool]:
        """The adapter to use, and whether it was created for this run."""
        adapters = self._connection.client.adapters
        state = self._resume_state
        if state is not None and state.get("dialect") == "finetunes":
            return await self._reattach(state), False
        if state is not None:
            return await adapters.create(self.name, self.rank, state["checkpoint_id"]), True
        if self.adapter_id is not None:
            return await adapters.get(self.adapter_id), False
        return await adapters.create(self.name, self.rank, self.from_checkpoint), True

    async def _reattach(self, state: dict[str, Any]) -> Adapter:
        """Resume on ``/finetunes``, which cannot create a finetune from a checkpoint.

        The same finetune goes on only where it is exactly at the checkpoint's step, so
        no step is counted twice or lost.
        """
        finetune = await self._connection.client.adapters.get(state["adapter_id"])
        if finetune.train_steps is None:
            # Moondream Cloud does not report a finetune's step: the first train step's
            # answer does, and a finetune that moved on stops the run then.
            rank_zero_warn(
                f"finetune {finetune.adapter_id} does not report its step; resuming at the "
                f"checkpoint's step {state['train_steps']}, checked by the first train step"
            )
            return finetune.model_copy(update={"train_steps": state["train_steps"]})
        if finetune.train_steps != state["train_steps"]:
            raise ResumeMismatchError(
                f"cannot resume finetune {finetune.adapter_id}: the checkpoint was taken at train "
                f"step {state['train_steps']} but the finetune reports {finetune.train_steps}. "
                "The /finetunes API cannot start a finetune from a checkpoint; resume from the "
                "checkpoint whose step matches, or start a new run (its inference model "
                f"{state['checkpoint_id']} stays usable)."
            )
        return finetune

    def close(self, wait: bool = True) -> None:
        """Close the client, its event loop, and a local service this process serves.

        Args:
            wait: Wait for a pending train step first. Without waiting, a step still in
                flight is abandoned and counts as in doubt: no checkpoint is taken until
                the adapter is opened again (resume from an earlier checkpoint).
        """
        try:
            if wait:
                self._remote.settle()
            else:
                self._remote.abandon()
        finally:
            self._connection.shutdown()

    # Lightning hooks -----------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        """The stand-in's optimizer: it carries ``lr`` (and its scheduler) to the service."""
        optimizer = SGD([self.remote_weights], lr=0.0 if self.lr is None else self.lr)
        if self.lr_scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"},
        }

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
        if not self._collective.distributed:
            self._collective = Collective.create(self.collective_timeout)
            self._remote.collective = self._collective
        root = self._trainer.default_root_dir if self._trainer is not None else "."
        self._connection.prepare(self._collective, root)
        self._run_usage = None

    def on_fit_start(self) -> None:
        """Open the adapter (and connect cloud loggers) before the first batch.

        Set-up errors so surface at once.

        Raises:
            ValueError: If SFT or ``lr`` is asked of a service speaking ``/adapters``.
        """
        self._bind_cloud_loggers()
        if self._connection.dialect == "adapters":
            wanted = [
                name
                for name, value in (
                    ("sft_warmup_steps", self.sft_warmup_steps),
                    ("sft_share", self.sft_share),
                    ("lr", self.lr),
                )
                if value
            ]
            if wanted:
                # Nothing was trained: an adapter made for this run goes with it.
                self._temporary_adapter = self._adapter_created
                raise ValueError(
                    f"{', '.join(wanted)}: the service speaks the /adapters dialect, which has no "
                    "SFT groups and no learning rate; unset them, or use a /finetunes service"
                )

    def on_validation_start(self) -> None:
        """Evaluate the adapter with every train step applied."""
        self._remote.drain()
        self._bind_cloud_loggers()

    def on_test_start(self) -> None:
        """Evaluate the adapter with every train step applied."""
        self._remote.drain()
        self._bind_cloud_loggers()

    def _bind_cloud_loggers(self) -> None:
        adapter_id = self.adapter.adapter_id
        if self._collective.is_zero and self._trainer is not None:
            for logger in self._cloud_loggers():
                logger.bind(self, adapter_id)

    def _cloud_loggers(self) -> list[CloudMetricsLogger]:
        loggers = self._trainer.loggers if self._trainer is not None else []
        return [logger for logger in loggers if isinstance(logger, CloudMetricsLogger)]

    def send_metrics(self, step: int, metrics: Mapping[str, float]) -> Future[int]:
        """Start logging ``metrics`` at ``step`` to the finetune (``/finetunes`` only).

        Returns:
            A future of how many metrics the service stored.
        """
        client = self._connection.client
        return self._connection.submit(client.metrics.log(self.adapter.adapter_id, step, metrics))

    def on_predict_start(self) -> None:
        """Open the adapter on every rank at once."""
        self.adapter  # noqa: B018

    def on_train_end(self) -> None:
        """Apply the last pending train step, and total the usage of every process."""
        self._remote.drain()
        self._total_usage()

    def on_test_epoch_end(self) -> None:
        """Compute and log the test metrics, and total the usage of every process."""
        self._log_metrics("test", self.test_metrics)
        self._total_usage()

    def _total_usage(self) -> None:
        if self._collective.distributed:
            states = self._collective.all_gather(self._connection.usage.state())
            self._run_usage = UsageStats.combined(states)

    def teardown(self, stage: str) -> None:
        """Close the connection; a later stage reconnects.

        The adapter stays, unless it was made for this validate, test or predict stage
        alone (from a checkpoint, or fresh for the base model): then it is deleted.
        """
        self._remote.drain()
        self._collective.barrier()
        self._release()

    def _release(self, wait: bool = True) -> None:
        try:
            for logger in self._cloud_loggers():
                logger.release()
            if self._adapter is not None and self._temporary_adapter:
                self._delete_temporary_adapter(self._adapter.adapter_id)
        finally:
            self.close(wait)

    def _delete_temporary_adapter(self, adapter_id: str) -> None:
        self._adapter, self._temporary_adapter = None, False
        if not self._collective.is_zero:
            return
        try:
            self._connection.run(self._connection.client.adapters.delete(adapter_id))
        except TuningAPIError as exc:
            rank_zero_warn(f"could not delete the evaluation adapter {adapter_id}: {exc}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save one API checkpoint (on rank 0) and record its id (never the key).

        Raises:
            AmbiguousTrainStepError: If the last train step may or may not have been
                applied: no checkpoint can then pair ``global_step`` with the adapter's
                state, so none is written (resume from an earlier one).
        """
        interrupted = (
            self._trainer is not None and self._trainer.state.status == TrainerStatus.INTERRUPTED
        )
        try:
            self._save_api_checkpoint(checkpoint, interrupted)
        finally:
            # A stage stopping on an error closed the module before checkpoint callbacks
            # (OnExceptionCheckpoint) ran; saving reconnected, so close again.
            if interrupted:
                self.close()

    def _save_api_checkpoint(self, checkpoint: dict[str, Any], interrupted: bool) -> None:
        self.last_saved_checkpoint_id = None
        if self._adapter is None:
            return
        if interrupted:
            # After an error the other ranks may be gone: no collectives, and only the
            # owner of the remote state saves.
            if not self._collective.is_zero:
                return
            self._remote.settle()
            state = self._api_checkpoint_state()
        else:
            self._remote.drain()
            state = self._collective.on_zero(self._api_checkpoint_state)
        self.last_saved_checkpoint_id = state["checkpoint_id"]
        checkpoint[CHECKPOINT_KEY] = state

    def _api_checkpoint_state(self) -> dict[str, Any]:
        adapter_id = self.adapter.adapter_id
        if self._remote.in_doubt:
            raise AmbiguousTrainStepError(
                f"not checkpointing: the trainer counted train step {self._remote.train_steps + 1} "
                f"but adapter {adapter_id} may not have it; resume from an earlier checkpoint"
            )
        client = self._connection.client
        # The client resolves a save of unknown outcome by listing, so this is the one
        # checkpoint the save made.
        saved = self._connection.run(client.checkpoints.save(adapter_id))
        return {
            "adapter_id": adapter_id,
            "checkpoint_id": saved.ref,
            "model_id": saved.model_id,
            "dialect": client.dialect,
            "train_steps": self._remote.train_steps,
            "skipped_steps": self._remote.skipped_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Continue from the API checkpoint on first use.

        On ``/adapters`` a new adapter is created from it, so steps applied to the old
        adapter after that checkpoint are not carried over and none is counted twice. On
        ``/finetunes`` the same finetune goes on if it is still at the checkpoint's step.
        """
        # Checkpoints of versions without the stand-in load as if it were there.
        checkpoint.get("state_dict", {}).setdefault("remote_weights", torch.zeros(()))
        state = checkpoint.get(CHECKPOINT_KEY)
        if not state:
            rank_zero_warn("the checkpoint has no Moondream state; starting a fresh adapter")
            return
        self._resume_state = dict(state)
        self._adapter = None

    def _resume_hint(self) -> str:
        callback = self._trainer.checkpoint_callback if self._trainer is not None else None
        saved = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        return f"ckpt_path={saved!r}" if saved else "ckpt_path=<your last checkpoint>.ckpt"

    # Training ------------------------------------------------------------------------------

    def training_step(self, batch: Sequence[Sample], batch_idx: int) -> torch.Tensor:
        """Sample and score the batch (or take its SFT targets) for the next train step.

        Returns:
            A zero loss on the stand-in parameter, for Lightning's backward pass.
        """
        error: Exception | None = None
        try:
            self._remote.add(self._shard_of(_encoded(_check_batch(batch, batch_idx))))
        except Exception as exc:
            error = exc
        # A failure on any rank ends every rank here, before the backward pass that
        # would wait for it.
        self._collective.check(error)
        return self.remote_weights * 0.0

    def _shard_of(self, samples: list[Sample]) -> Shard:
        if self.global_step < self.sft_warmup_steps:
            taught = [sample.sft_group(self.train_settings) for sample in samples]
            return Shard(groups=list(taught), sft_groups=len(taught))
        started = time.perf_counter()
        scored = self._connection.run(
            self._sample_and_score(
                samples, self.adapter.adapter_id, self.train_settings, self.num_rollouts
            )
        )
        groups: list[Any] = [
            response.to_group(rewards)
            for response, rewards in scored
            if len(rewards) > 1 and spread(rewards) >= self.reward_std_eps
        ]
        taught = [
            sample.sft_group(self.train_settings) for sample in _share(samples, self.sft_share)
        ]
        return Shard(
            groups=groups + taught,
            rewards=[rewards for _, rewards in scored],
            sft_groups=len(taught),
            rollout_seconds=time.perf_counter() - started,
        )

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Run the last batch's step, then send one remote train step at the current lr."""
        optimizer.step(closure=optimizer_closure)
        lr = None if self.lr is None else float(optimizer.param_groups[0]["lr"])
        self._report = self._remote.step(self.adapter.adapter_id, lr)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log the train step's statistics, the same on every rank."""
        report, self._report = self._report, None
        if report is None:
            return
        metrics = {f"train/{name}": value for name, value in report.metrics.items()}
        reward = metrics.pop("train/reward_mean", None)
        if reward is not None:
            self.log("train/reward_mean", reward, prog_bar=True, batch_size=1)
        self.log_dict(metrics, batch_size=1)

    def _concurrency(self, requests: int) -> int:
        if self.max_concurrency is not None:
            return self.max_concurrency
        return max(1, min(MAX_DEFAULT_CONCURRENCY, requests))

    async def _sample_and_score(
        self, samples: Sequence[Sample], adapter_id: str, settings: Settings, num_rollouts: int
    ) -> list[tuple[RolloutsResponse, list[float]]]:
        return await sample_and_score(
            self._connection.client,
            adapter_id,
            samples,
            settings=settings,
            num_rollouts=num_rollouts,
            scorer=self.scorer,
            max_concurrency=self._concurrency(len(samples)),
        )

    # Evaluation ----------------------------------------------------------------------------

    def _evaluate(
        self, batch: Sequence[Sample], batch_idx: int, metrics: SkillMetrics
    ) -> list[dict[str, Any]]:
        samples = _encoded(_check_batch(batch, batch_idx))
        scored = self._connection.run(
            self._sample_and_score(samples, self.adapter.adapter_id, self.eval_settings, 1)
        )
        records = []
        for sample, (response, rewards) in zip(samples, scored, strict=True):
            output = response.rollouts[0].output
            metrics.update(
                sample.skill,
                output,
                sample.target(),
                getattr(sample, "image_size", None),
                sample.label,
            )
            records.append({"sample": sample, "output": output, "reward": rewards[0]})
        return records

    def _log_rewards(self, stage: str, records: list[dict[str, Any]]) -> None:
        mean = statistics.fmean(record["reward"] for record in records)
        self.log(
            f"{stage}/reward",
            mean,
            prog_bar=stage == "val",
            batch_size=len(records),
            sync_dist=True,
        )

    def _log_metrics(self, stage: str, metrics: SkillMetrics) -> None:
        values = metrics.compute()
        metrics.reset()
        # Already totalled over every rank by torchmetrics; synced again only so that
        # Lightning knows every rank holds the same value.
        self.log_dict({f"{stage}/{name}": value for name, value in values.items()}, sync_dist=True)

    # Records, not a loss: callbacks (prediction images) read them in on_*_batch_end.
    def validation_step(self, batch: Sequence[Sample], batch_idx: int) -> list[dict[str, Any]]:  # type: ignore[override]
        """One greedy rollout per sample, scored and added to the epoch's metrics."""
        records = self._evaluate(batch, batch_idx, self.val_metrics)
        self._log_rewards("val", records)
        return records

    def on_validation_epoch_end(self) -> None:
        """Compute and log the epoch's metrics (``val/map``, ``val/det_f1``, ...)."""
        self._log_metrics("val", self.val_metrics)

    def test_step(self, batch: Sequence[Sample], batch_idx: int) -> list[dict[str, Any]]:  # type: ignore[override]
        """One greedy rollout per sample, scored and added to the test metrics."""
        records = self._evaluate(batch, batch_idx, self.test_metrics)
        self._log_rewards("test", records)
        return records

    def generate(
        self, samples: Sequence[Sample], settings: Settings | None = None
    ) -> list[RolloutsResponse]:
        """One rollout per sample from the current adapter, in the order given.

        Args:
            samples: The samples to answer.
            settings: Sampling settings; by default ``eval_settings`` (greedy).

        Returns:
            One response per sample; ``response.rollouts[0].output`` is the answer.
        """
        settings = self.eval_settings if settings is None else settings
        samples = _encoded(samples)
        calls = [
            RolloutCall(self.adapter.adapter_id, sample.to_request(settings), 1)
            for sample in samples
        ]
        return self._connection.run(
            self._connection.client.rollouts_many(
                calls, max_concurrency=self._concurrency(len(calls))
            )
        )

    def predict_step(self, batch: Sequence[Sample], batch_idx: int) -> list[dict[str, Any]]:
        """One greedy rollout per sample: ``{"id", "skill", "label", "output"}`` records."""
        samples = _check_batch(batch, batch_idx)
        responses = self.generate(samples)
        return [
            {
                "id": sample.id,
                "skill": sample.skill,
                "label": sample.label,
                "output": response.rollouts[0].output,
            }
            for sample, response in zip(samples, responses, strict=True)
        ]

    def evaluate(
        self, batches: Iterable[Sequence[Sample]], *, progress: Callable[[int], None] | None = None
    ) -> dict[str, float]:
        """Evaluate the current adapter outside a ``Trainer`` loop.

        Within a multi-process ``Trainer`` run (from a callback, after ``setup``), call
        it on every process, each with its own share of the data (as
        ``MoondreamDataModule``'s loaders give it): the results cover all of them.

        Args:
            batches: Batches of samples, e.g. a validation ``DataLoader``.
            progress: Called with the number of samples done after each batch.

        Returns:
            The metrics of ``SkillMetrics`` plus ``reward`` and ``samples``.
        """
        self._remote.drain()
        self.adapter  # noqa: B018 - opened on every rank at once
        metrics = SkillMetrics()
        every_reward: list[float] = []
        for index, batch in enumerate(batches):
            records = self._evaluate(batch, index, metrics)
            every_reward.extend(record["reward"] for record in records)
            if progress is not None:
                progress(len(every_reward))
        # torchmetrics totals the metrics over every process; the rewards, here.
        values = {name: float(value) for name, value in metrics.compute().items()}
        shares = self._collective.all_gather((math.fsum(every_reward), len(every_reward)))
        total, count = math.fsum(share[0] for share in shares), sum(share[1] for share in shares)
        if count:
            values["reward"] = total / count
        values["samples"] = float(count)
        return values

    def delete_api_checkpoint(self, checkpoint_id: str) -> None:
        """Delete an API checkpoint (used when its Lightning checkpoint is removed)."""
        self._connection.run(self._connection.client.checkpoints.delete(checkpoint_id))


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


def _encoded(samples: Sequence[Sample]) -> list[Sample]:
    """The samples with their images encoded (``SAMPLE_ENCODING``) if they are not yet.

    Samples of ``MoondreamDataModule`` arrive encoded and are returned as they are.
    """
    return [
        sample.encoded(SAMPLE_ENCODING) if hasattr(sample, "encoded") else sample
        for sample in samples
    ]


def _check_batch(batch: Sequence[Sample], batch_idx: int) -> Sequence[Sample]:
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence):
        raise TypeError(
            f"batch {batch_idx} is a {type(batch).__name__}; MoondreamRLModule takes a list of samples "
            "(use MoondreamDataModule, or collate_fn=list in your DataLoader)"
        )
    if not batch:
        raise ValueError(f"batch {batch_idx} is empty: a training step needs at least one sample")
    for index, sample in enumerate(batch):
        if not hasattr(sample, "to_request") or getattr(sample, "skill", None) not in (
            "query",
            "point",
            "detect",
        ):
            raise TypeError(
                f"batch {batch_idx} item {index} is a {type(sample).__name__}, not a Moondream sample "
                "(DetectSample, PointSample or QuerySample)"
            )
    return batch


def _share(samples: Sequence[Sample], share: float) -> list[Sample]:
    """The samples that a ``share`` of the batch picks, spread evenly over it."""
    return [
        sample
        for index, sample in enumerate(samples)
        if math.floor((index + 1) * share) > math.floor(index * share)
    ]


_ARGUMENT_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "rank": (lambda value: value in (16, 32), "must be 16 or 32"),
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
}


_ARGUMENT_REASONS = {
    "num_rollouts": ": training learns from the differences between the rollouts of a sample",
}


def _check_arguments(**arguments: Any) -> None:
    """Refuse arguments that cannot work, naming the argument and what it takes."""
    for name, value in arguments.items():
        valid, expected = _ARGUMENT_RULES[name]
        if not valid(value):
            why = _ARGUMENT_REASONS.get(name, "")
            raise ValueError(f"{name} {expected}, got {value!r}{why}")
