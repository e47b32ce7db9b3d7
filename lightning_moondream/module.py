"""``MoondreamRLModule``: a Moondream adapter trained by RL through the tuning API.

The model lives on the server; this module holds no parameters. A training step asks
for rollouts of every sample in the batch at once, scores them, and sends one
``/train_step`` with every group whose rewards differ. Each applied remote step advances
``global_step`` through a stand-in optimizer, so ``max_steps``, ``val_check_interval``,
``ModelCheckpoint`` and early stopping behave as usual.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from pydantic import SecretStr

from lightning_moondream.api import (
    Adapter,
    AmbiguousRequestError,
    AsyncTuningClient,
    BackgroundLoop,
    RolloutCall,
    RolloutsResponse,
    Settings,
    TuningAPIError,
    UsageStats,
)
from lightning_moondream.data.encoding import DEFAULT_MAX_SIDE, DEFAULT_QUALITY
from lightning_moondream.images import EncodingOptions
from lightning_moondream.metrics import SkillMetrics
from lightning_moondream.scoring import RewardSpec, Sample, Scorer, sample_and_score

# Expected by design: no local optimizer, and batches of samples that stay on the host.
warnings.filterwarnings(
    "ignore", message=r".*configure_optimizers. returned .None.", category=UserWarning
)
warnings.filterwarnings(
    "ignore", message=r".*overridden .transfer_batch_to_device.", category=UserWarning
)

MAX_DEFAULT_CONCURRENCY = 64
"""Most rollouts requests in flight by default: the whole batch, up to this many."""

SAMPLE_ENCODING = EncodingOptions(max_side=DEFAULT_MAX_SIDE, quality=DEFAULT_QUALITY)
"""How a sample that reaches the module unencoded is encoded: as ``MoondreamDataModule``
encodes by default, so a user's own DataLoader of paths or PIL images sends the same bytes."""

CHECKPOINT_KEY = "moondream"
"""Key of the API state (adapter and checkpoint ids, never the key) in Lightning checkpoints."""


class AmbiguousTrainStepError(RuntimeError):
    """A train step may or may not have been applied, and the server cannot tell which."""


class ResumeMismatchError(RuntimeError):
    """A finetune is no longer at the step of the checkpoint a run resumes from."""


class TrainStepFailedError(RuntimeError):
    """A train step failed on every attempt and is known not to have been applied."""


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
        local_service: Options of the in-process local service, used when neither a key
            nor a base URL is set (e.g. ``{"data_dir": "..."}``; by default it keeps its
            data under the trainer's ``default_root_dir``).
        on_ambiguous_step: What to do when a train step may or may not have been applied
            and the server does not report ``train_steps``: ``raise`` (stop, to resume
            from the last checkpoint) or ``skip`` (count it as applied, warn, never resend).
        max_retries: Retries of failed requests where retrying is safe.
        timeout: Seconds per request; by default 120 s for rollouts, 900 s for steps.
        dialect: The tuning API's wire dialect: ``auto`` (detected without side effects,
            ``/finetunes`` preferred), ``adapters`` or ``finetunes``.
    """

    # True from the moment a train step is sent until the server's state is known again
    # (applied, or provably not applied); no checkpoint may be taken in between.
    _step_in_doubt: bool = False

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
        dialect: Literal["auto", "adapters", "finetunes"] = "auto",
    ) -> None:
        super().__init__()
        if rank not in (16, 32):
            raise ValueError(f"rank must be 16 or 32, got {rank}")
        if not 2 <= num_rollouts <= 16:
            raise ValueError(
                f"num_rollouts must be from 2 to 16, got {num_rollouts}: training learns from "
                "the differences between the rollouts of a sample"
            )
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
        if max_staleness not in (0, 1):
            raise ValueError(f"max_staleness must be 0 or 1, got {max_staleness}")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if on_ambiguous_step not in ("raise", "skip"):
            raise ValueError(
                f"on_ambiguous_step must be 'raise' or 'skip', got {on_ambiguous_step!r}"
            )
        ignored = ["api_key"] + (
            [] if reward is None or isinstance(reward, (str, dict)) else ["reward"]
        )
        self.save_hyperparameters(ignore=ignored)
        self.automatic_optimization = False
        self.name = name
        self.rank = rank
        self.adapter_id = adapter_id
        self.from_checkpoint = from_checkpoint
        self.num_rollouts = num_rollouts
        self.reward_std_eps = reward_std_eps
        self.max_concurrency = max_concurrency
        self.max_staleness = max_staleness
        self.base_url = base_url
        self.local_service = dict(local_service or {})
        self.on_ambiguous_step = on_ambiguous_step
        self.max_retries = max_retries
        self.timeout = timeout
        if dialect not in ("auto", "adapters", "finetunes"):
            raise ValueError(f"dialect must be 'auto', 'adapters' or 'finetunes', got {dialect!r}")
        self.dialect = dialect
        self.train_settings = _settings(train_settings, temperature=1.0)
        self.eval_settings = _settings(eval_settings, temperature=0.0)
        self.scorer = Scorer(reward)
        self._api_key = (
            api_key if isinstance(api_key, SecretStr) or api_key is None else SecretStr(api_key)
        )
        self.val_metrics = SkillMetrics()
        self.test_metrics = SkillMetrics()
        self._loop: BackgroundLoop | None = None
        self._client: AsyncTuningClient | None = None
        self._adapter: Adapter | None = None
        self._remote_train_steps = 0
        self._resume_state: dict[str, Any] | None = None
        self._pending_step: Future[None] | None = None
        self._announced_local_service = False
        self._temporary_adapter = False
        self._warned_no_spread = False
        self.usage = UsageStats()
        """Counts of requests, rollouts, train steps, retries, bytes and latencies, kept
        across reconnections (fit, then validate or test)."""
        self.last_saved_checkpoint_id: str | None = None
        """Id of the API checkpoint saved with the most recent Lightning checkpoint."""

    # Connection ----------------------------------------------------------------------------

    @property
    def uses_local_service(self) -> bool:
        """Whether no key and no base URL are set, so the in-process local service serves."""
        return (
            self._api_key is None
            and not os.environ.get("MOONDREAM_API_KEY")
            and self.base_url is None
            and not os.environ.get("MOONDREAM_TUNING_URL")
        )

    @property
    def client(self) -> AsyncTuningClient:
        """The API client, connected on first use."""
        if self._client is None:
            self._loop = BackgroundLoop()
            self._client = self._connect()
            self._client.usage = self.usage
        return self._client

    def _connect(self) -> AsyncTuningClient:
        if not self.uses_local_service:
            return AsyncTuningClient(
                api_key=self._api_key,
                base_url=self.base_url,
                timeout=self.timeout,
                max_retries=self.max_retries,
                dialect=self.dialect,
            )
        service = dict(self.local_service or {})
        root = self._trainer.default_root_dir if self._trainer is not None else os.getcwd()
        service.setdefault("data_dir", str(Path(root) / "moondream-local-service"))
        if not self._announced_local_service:
            self._announced_local_service = True
            rank_zero_info(
                "No MOONDREAM_API_KEY and no base_url: training against the local tuning service in "
                f"this process (data in {service['data_dir']}), an offline stand-in for Moondream Cloud."
            )
        client = AsyncTuningClient.local(dialect=self.dialect, **service)
        client.retry_policy.max_retries = self.max_retries
        client.timeout = self.timeout
        return client

    def _run(self, coroutine: Any) -> Any:
        self.client  # noqa: B018 - connect before the loop is needed
        assert self._loop is not None
        return self._loop.run(coroutine)

    @property
    def adapter(self) -> Adapter:
        """The adapter being trained or evaluated, created or attached on first use."""
        if self._adapter is None:
            self._adapter, created = self._run(self._open_adapter())
            self._remote_train_steps = self._adapter.train_steps or 0
            stage = self._trainer.state.fn if self._trainer is not None else None
            # An adapter made only to validate, test or predict is removed with the stage.
            self._temporary_adapter = created and stage in (
                TrainerFn.VALIDATING,
                TrainerFn.TESTING,
                TrainerFn.PREDICTING,
            )
            rank_zero_info(
                f"Moondream adapter {self._adapter.adapter_id} (rank {self._adapter.rank})"
                + (
                    f" from checkpoint {self._resume_state['checkpoint_id']}"
                    if self._resume_state
                    else ""
                )
            )
        return self._adapter

    async def _open_adapter(self) -> tuple[Adapter, bool]:
        """The adapter to use, and whether it was created for this run."""
        adapters = self.client.adapters
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
        finetune = await self.client.adapters.get(state["adapter_id"])
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
        """Close the client and its event loop.

        Args:
            wait: Wait for a pending train step first. Without waiting, a step still in
                flight is cancelled and counts as in doubt: no checkpoint is taken until
                the adapter's state is known again.
        """
        try:
            if wait:
                self._drain()
            elif self._pending_step is not None and not self._pending_step.done():
                self._step_in_doubt = True
        finally:
            self._pending_step = None
            if self._client is not None and self._loop is not None:
                self._loop.run(self._client.close())
                self._loop.close()
            self._client, self._loop = None, None

    # Lightning hooks -----------------------------------------------------------------------

    def configure_optimizers(self) -> None:
        """No local parameters: the optimizer runs on the server."""
        return None

    def configure_callbacks(self) -> list[Callback]:
        """End a stage that stops on an error as ``teardown`` ends others (Lightning skips it then)."""
        return [_CloseOnException()]

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        """Leave batches where they are: samples hold no tensors, and they go to the server."""
        return batch

    def on_fit_start(self) -> None:
        """Open the adapter before the first batch, so set-up errors surface at once."""
        self.adapter  # noqa: B018

    def on_validation_start(self) -> None:
        """Evaluate the adapter with every train step applied."""
        self._drain()

    def on_test_start(self) -> None:
        """Evaluate the adapter with every train step applied."""
        self._drain()

    def on_train_end(self) -> None:
        """Apply the last pending train step before training ends."""
        self._drain()

    def teardown(self, stage: str) -> None:
        """Close the connection; a later stage reconnects.

        The adapter stays, unless it was made for this validate, test or predict stage
        alone (from a checkpoint, or fresh for the base model): then it is deleted.
        """
        self._release()

    def _release(self, wait: bool = True) -> None:
        try:
            if self._adapter is not None and self._temporary_adapter:
                self._delete_temporary_adapter(self._adapter.adapter_id)
        finally:
            self.close(wait)

    def _delete_temporary_adapter(self, adapter_id: str) -> None:
        self._adapter, self._temporary_adapter = None, False
        try:
            self._run(self.client.adapters.delete(adapter_id))
        except TuningAPIError as exc:
            rank_zero_warn(f"could not delete the evaluation adapter {adapter_id}: {exc}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save an API checkpoint and record its id (never the key) in the checkpoint.

        Raises:
            AmbiguousTrainStepError: If the last train step may or may not have been
                applied: no checkpoint can then pair ``global_step`` with the adapter's
                state, so none is written (resume from an earlier one).
        """
        try:
            self._save_api_checkpoint(checkpoint)
        finally:
            # A stage stopping on an error closed the module before checkpoint callbacks
            # (OnExceptionCheckpoint) ran; saving reconnected, so close again.
            if (
                self._trainer is not None
                and self._trainer.state.status == TrainerStatus.INTERRUPTED
            ):
                self.close()

    def _save_api_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.last_saved_checkpoint_id = None
        if self._adapter is None:
            return
        self._drain()
        adapter_id = self._adapter.adapter_id
        if self._step_in_doubt:
            raise AmbiguousTrainStepError(
                f"not checkpointing: the trainer counted train step {self._remote_train_steps + 1} "
                f"but adapter {adapter_id} may not have it; resume from an earlier checkpoint"
            )
        # The client resolves a save of unknown outcome by listing, so this is the one
        # checkpoint the save made.
        saved = self._run(self.client.checkpoints.save(adapter_id))
        self.last_saved_checkpoint_id = saved.ref
        checkpoint[CHECKPOINT_KEY] = {
            "adapter_id": adapter_id,
            "checkpoint_id": saved.ref,
            "dialect": self.client.dialect,
            "train_steps": self._remote_train_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Continue from the API checkpoint on first use.

        On ``/adapters`` a new adapter is created from it, so steps applied to the old
        adapter after that checkpoint are not carried over and none is counted twice. On
        ``/finetunes`` the same finetune goes on if it is still at the checkpoint's step.
        """
        state = checkpoint.get(CHECKPOINT_KEY)
        if not state:
            rank_zero_warn("the checkpoint has no Moondream state; starting a fresh adapter")
            return
        self._resume_state = dict(state)
        self._adapter = None

    # Training ------------------------------------------------------------------------------

    def training_step(self, batch: Sequence[Sample], batch_idx: int) -> None:
        """Sample, score and apply one remote train step for the batch."""
        samples = _encoded(_check_batch(batch, batch_idx))
        adapter_id = self.adapter.adapter_id
        started = time.perf_counter()
        scored = self._run(
            self._sample_and_score(samples, adapter_id, self.train_settings, self.num_rollouts)
        )
        rollout_seconds = time.perf_counter() - started
        # With max_staleness=1 the previous step was applied while these rollouts ran.
        self._drain()
        groups = [
            response.to_group(rewards)
            for response, rewards in scored
            if len(rewards) > 1 and _spread(rewards) >= self.reward_std_eps
        ]
        # Sent before anything is logged: Lightning's logging costs milliseconds per value.
        sent = time.perf_counter()
        if groups:
            self._pending_step = self._loop_submit(self._apply_train_step(adapter_id, groups))
        try:
            self._log_batch(scored, len(groups), rollout_seconds, batch_idx)
        finally:
            # Counted even if logging failed: global_step must match the adapter's steps.
            if groups:
                self._count_step(sent, len(samples))

    def _log_batch(
        self,
        scored: list[tuple[RolloutsResponse, list[float]]],
        groups: int,
        rollout_seconds: float,
        batch_idx: int,
    ) -> None:
        every_reward = [reward for _, rewards in scored for reward in rewards]
        size = len(scored)
        self.log(
            "train/reward_mean", statistics.fmean(every_reward), prog_bar=True, batch_size=size
        )
        self.log("train/reward_std", _spread(every_reward), batch_size=size)
        self.log("train/frac_zero_std", 1.0 - groups / size, batch_size=size)
        self.log("train/groups", float(groups), batch_size=size)
        self.log("train/rollouts_time_s", rollout_seconds, batch_size=size)
        if not groups and not self._warned_no_spread:
            self._warned_no_spread = True
            rank_zero_warn(
                f"batch {batch_idx}: every sample's rollouts scored alike, so there is nothing "
                "to learn from and no train step was applied (global_step does not advance); "
                "check the reward, or sample with more variety (temperature, num_rollouts)"
            )

    def _count_step(self, sent: float, size: int) -> None:
        """Advance ``global_step`` for a sent train step, once applied at staleness 0."""
        waited = self.max_staleness == 0 and self._pending_step is not None
        if waited:
            self._drain()
        # The stand-in optimizer's step is what advances global_step in manual optimization.
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)
        optimizer.step()
        if waited:
            self.log("train/train_step_time_s", time.perf_counter() - sent, batch_size=size)

    def _concurrency(self, requests: int) -> int:
        if self.max_concurrency is not None:
            return self.max_concurrency
        return max(1, min(MAX_DEFAULT_CONCURRENCY, requests))

    def _loop_submit(self, coroutine: Any) -> Future[Any]:
        self.client  # noqa: B018
        assert self._loop is not None
        return self._loop.submit(coroutine)

    def _drain(self) -> None:
        pending, self._pending_step = self._pending_step, None
        if pending is not None:
            pending.result()

    async def _sample_and_score(
        self, samples: Sequence[Sample], adapter_id: str, settings: Settings, num_rollouts: int
    ) -> list[tuple[RolloutsResponse, list[float]]]:
        return await sample_and_score(
            self.client,
            adapter_id,
            samples,
            settings=settings,
            num_rollouts=num_rollouts,
            scorer=self.scorer,
            max_concurrency=self._concurrency(len(samples)),
        )

    async def _apply_train_step(self, adapter_id: str, groups: list[Any]) -> None:
        applied_before = self._remote_train_steps
        self._step_in_doubt = True
        for _ in range(self.max_retries + 1):
            try:
                await self.client.train_step(adapter_id, groups)
                break
            except AmbiguousRequestError as exc:
                if not await self._resend_needed(adapter_id, applied_before, exc):
                    break
            except TuningAPIError:
                # Refused or never sent: the step is known not to be applied. With
                # max_staleness=1 it was already counted, so the count is now one ahead
                # of the adapter and no checkpoint may pair them.
                self._step_in_doubt = self.max_staleness == 1
                raise
        else:
            self._step_in_doubt = self.max_staleness == 1
            raise TrainStepFailedError(
                f"train step {applied_before + 1} of adapter {adapter_id} failed on every attempt "
                "and was not applied"
            )
        self._remote_train_steps = applied_before + 1
        self._step_in_doubt = False

    async def _resend_needed(
        self, adapter_id: str, applied_before: int, error: AmbiguousRequestError
    ) -> bool:
        """Read the adapter back to learn whether an ambiguous train step was applied."""
        reported = (await self.client.adapters.get(adapter_id)).train_steps
        if reported == applied_before:
            rank_zero_warn(
                f"train step {applied_before + 1} was not applied ({error.cause.message}); resending it"
            )
            return True
        if reported == applied_before + 1:
            return False
        if reported is None and self.on_ambiguous_step == "skip":
            rank_zero_warn(
                f"train step {applied_before + 1} may or may not have been applied ({error.cause.message}); "
                "counting it as applied and going on (on_ambiguous_step='skip')"
            )
            return False
        if reported is None:
            callback = self._trainer.checkpoint_callback if self._trainer is not None else None
            saved = getattr(callback, "last_model_path", "") or getattr(
                callback, "best_model_path", ""
            )
            resume = f"ckpt_path={saved!r}" if saved else "ckpt_path=<your last checkpoint>.ckpt"
            raise AmbiguousTrainStepError(
                f"train step {applied_before + 1} of adapter {adapter_id} may or may not have been applied "
                f"({error.cause.message}) and the server does not report train_steps. Resume from the "
                f"last checkpoint ({resume}) to continue exactly, or set "
                "on_ambiguous_step='skip' to count such steps as applied."
            ) from error
        raise AmbiguousTrainStepError(
            f"adapter {adapter_id} reports {reported} train steps where {applied_before} or "
            f"{applied_before + 1} were expected: is another run training it?"
        ) from error

    # Evaluation ----------------------------------------------------------------------------

    def _evaluate(
        self, batch: Sequence[Sample], batch_idx: int, metrics: SkillMetrics
    ) -> list[dict[str, Any]]:
        samples = _encoded(_check_batch(batch, batch_idx))
        scored = self._run(
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
        self.log(f"{stage}/reward", mean, prog_bar=stage == "val", batch_size=len(records))

    def _log_metrics(self, stage: str, metrics: SkillMetrics) -> None:
        values = metrics.compute()
        metrics.reset()
        self.log_dict({f"{stage}/{name}": value for name, value in values.items()})

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

    def on_test_epoch_end(self) -> None:
        """Compute and log the test metrics."""
        self._log_metrics("test", self.test_metrics)

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
        return self._run(
            self.client.rollouts_many(calls, max_concurrency=self._concurrency(len(calls)))
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

        Args:
            batches: Batches of samples, e.g. a validation ``DataLoader``.
            progress: Called with the number of samples done after each batch.

        Returns:
            The metrics of ``SkillMetrics`` plus ``reward`` and ``samples``.
        """
        self._drain()
        metrics = SkillMetrics()
        every_reward: list[float] = []
        for index, batch in enumerate(batches):
            records = self._evaluate(batch, index, metrics)
            every_reward.extend(record["reward"] for record in records)
            if progress is not None:
                progress(len(every_reward))
        values = {name: float(value) for name, value in metrics.compute().items()}
        if every_reward:
            values["reward"] = statistics.fmean(every_reward)
        values["samples"] = float(len(every_reward))
        return values

    def delete_api_checkpoint(self, checkpoint_id: str) -> None:
        """Delete an API checkpoint (used when its Lightning checkpoint is removed)."""
        self._run(self.client.checkpoints.delete(checkpoint_id))


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


def _spread(values: Sequence[float]) -> float:
    """Population standard deviation in float arithmetic.

    ``statistics.pstdev`` computes in exact fractions, which costs milliseconds per batch
    on the path between the rollouts and the train step.
    """
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((value - mean) ** 2 for value in values) / len(values))


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
