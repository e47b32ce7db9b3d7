"""``Session``: one adapter trained and evaluated through the tuning API, without Lightning.

The session owns what a run does with the service: the connection, the adapter's life,
sampling and scoring, the remote train step, API checkpoints, usage and evaluation. The
dialect is the client's (given, or settled by the client on its first requests); the
session only reads it. Calls that take no collective are for one process; those marked
"on every rank" are collectives of a multi-process run.

Three collaborators do parts of the work: a :class:`~.teaching.Teacher` turns batches into
shards, :class:`~.checkpoints.Checkpoints` keeps the API checkpoints, and an
:class:`~.evaluator.Evaluator` answers and scores; the session holds them together.
"""

from __future__ import annotations

import logging
import secrets
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from lightning_moondream.api import (
    Adapter,
    AsyncTuningClient,
    RolloutsResponse,
    Settings,
    TuningAPIError,
    UsageStats,
)
from lightning_moondream.api.client import DialectChoice
from lightning_moondream.api.inference import AsyncInferenceClient
from lightning_moondream.distributed import Collective
from lightning_moondream.metrics import SkillMetrics
from lightning_moondream.scoring import Sample, Scorer
from lightning_moondream.session.adapter import AdapterPlan, open_adapter
from lightning_moondream.session.checkpoints import Checkpoints
from lightning_moondream.session.connection import Connection
from lightning_moondream.session.evaluation import Scored, Tally
from lightning_moondream.session.evaluator import Evaluator
from lightning_moondream.session.options import SessionOptions
from lightning_moondream.session.remote_step import (
    RemoteStep,
    Shard,
    StepReport,
)
from lightning_moondream.session.sampling import (
    GreedyModel,
)
from lightning_moondream.session.service import ServiceChoice
from lightning_moondream.session.signal import PromptFilter
from lightning_moondream.session.teaching import Teacher

logger = logging.getLogger(__name__)


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


class Session:
    """A run's adapter on a tuning service: opened on first use, trained, evaluated, saved.

    Args:
        options: What to train and how.
        choice: The service to talk to.
        scorer: Scores rollouts (the service's rewards, or a reward function).
        info: Reports progress (by default, this module's logger); in a multi-process
            run, give one that speaks on rank 0 only.
        warn: Reports what a user should know (by default, a ``UserWarning``).
        resume_hint: Names the checkpoint to resume from, for error messages.
    """

    def __init__(
        self,
        options: SessionOptions,
        choice: ServiceChoice,
        scorer: Scorer,
        *,
        info: Callable[[str], None] = logger.info,
        warn: Callable[[str], None] = _warn,
        resume_hint: Callable[[], str] = lambda: "ckpt_path=<your last checkpoint>.ckpt",
    ) -> None:
        self.options = options
        self.scorer = scorer
        self.collective = Collective()
        """The run's collectives, joined at :meth:`join`; trivial in one process."""
        self.connection = Connection(choice, UsageStats(), info, options.requests_per_second)
        self.remote = RemoteStep(
            self.connection,
            max_staleness=options.max_staleness,
            max_retries=options.max_retries,
            on_ambiguous_step=options.on_ambiguous_step,
            resume_hint=resume_hint,
        )
        self._info, self._warn = info, warn
        self._adapter: Adapter | None = None
        self._created = self._temporary = self._evaluating_only = False
        self._run_usage: UsageStats | None = None
        self.teacher = Teacher(self)
        """Turns batches into this rank's shards of the next train step."""
        self.checkpoints = Checkpoints(self, info)
        """The API checkpoints: resumed from, under evaluation, saved."""
        self.evaluator = Evaluator(self)
        """Answers samples greedily and scores the answers."""
        self._inference: tuple[AsyncTuningClient, AsyncInferenceClient] | None = None

    # The service --------------------------------------------------------------------------

    def join(self, root_dir: str | Path, *, evaluating_only: bool) -> None:
        """Join the run's processes and settle where the local service lives (on every rank).

        Args:
            root_dir: The run's root folder, home of the local service's data.
            evaluating_only: Whether this stage only evaluates, so that an adapter it
                creates is deleted when the stage ends.
        """
        if not self.collective.distributed:
            self.collective = Collective.create(self.options.collective_timeout)
        self.connection.prepare(self.collective, root_dir)
        self._evaluating_only = evaluating_only
        if not evaluating_only:
            # Trained from here on: what the module holds is the adapter, not a checkpoint.
            self.checkpoints.evaluated = None
        self._run_usage = None

    @property
    def client(self) -> AsyncTuningClient:
        """The API client, connected on first use."""
        return self.connection.client

    @property
    def inference(self) -> AsyncInferenceClient:
        """The inference API's client, bound to the service the tuning client talks to.

        It sends through the tuning client's connection: a remote service's inference
        URL is its tuning URL without ``/tuning``; the local service in this process is
        the same app; in a multi-process run, rank 0's served URL.
        """
        client = self.client
        if self._inference is None or self._inference[0] is not client:
            inference = AsyncInferenceClient.for_tuning(client)
            inference.usage = client.usage
            self._inference = (client, inference)
        return self._inference[1]

    @property
    def dialect(self) -> DialectChoice | None:
        """The dialect the service speaks, as the client settled it (``None`` before).

        Once the adapter is open, every rank reads rank 0's client, which opened it.
        """
        return self.connection.dialect

    @property
    def usage(self) -> UsageStats:
        """Counts of requests, rollouts, train steps, retries, bytes and latencies.

        Kept across reconnections. While a stage runs they are this process's; once
        ``fit`` has trained or ``test`` has tested, they cover every process of the run
        (:meth:`total_usage`), until the next stage starts.
        """
        return self._run_usage or self.connection.usage

    def total_usage(self) -> None:
        """Total the usage of every process (on every rank)."""
        if self.collective.distributed:
            states = self.collective.all_gather(self.connection.usage.state())
            self._run_usage = UsageStats.combined(states)

    def send_metrics(self, step: int, metrics: Mapping[str, float]) -> Future[int]:
        """Start logging ``metrics`` at ``step`` to the finetune; a future of how many were stored."""
        return self.connection.submit(
            self.client.metrics.log(self.adapter.adapter_id, step, metrics)
        )

    # The adapter --------------------------------------------------------------------------

    @property
    def adapter(self) -> Adapter:
        """The adapter, opened on first use: rank 0 opens it and shares it (on every rank)."""
        if self._adapter is None:
            adapter, created, dialect = self.collective.on_zero(self._open)
            resumed = self.checkpoints.resumed or {}
            on_finetunes = dialect == "finetunes"
            # Where the finetune's step could not be read, its first answer tells it.
            may_be_ahead = bool(resumed) and on_finetunes and self.options.resume_at_finetune_step
            self.remote.reset(
                adapter.train_steps or 0,
                resumed.get("skipped_steps", 0),
                steps_in_answers=on_finetunes,
                go_on_ahead=self._info if may_be_ahead else None,
            )
            self._adapter, self._created = adapter, created
            self.connection.settle(dialect)
            self._temporary = created and self._evaluating_only
            origin = f" from checkpoint {self.resumed_from}" if self.checkpoints.resumed else ""
            self._info(
                f"Moondream adapter {adapter.adapter_id} (rank {adapter.rank}, {dialect} "
                f"dialect){origin}"
            )
        return self._adapter

    @property
    def checkpoint_model(self) -> str | None:
        """The inference model answering for a checkpoint under evaluation, if any.

        See :meth:`Checkpoints.model`: only in a stage that only evaluates.
        """
        return self.checkpoints.model(self._evaluating_only)

    def _open(self) -> tuple[Adapter, bool, DialectChoice | None]:
        options = self.options
        name = options.name
        if self._evaluating_only:
            # A name is a finetune's identity on /finetunes: creating under the run's
            # name would hand back (and later delete) the finetune a fit trained.
            name = f"{name}-eval-{secrets.token_hex(4)}"
        plan = AdapterPlan(
            name,
            options.rank,
            options.adapter_id,
            options.from_checkpoint,
            options.resume_at_finetune_step,
        )
        if self.checkpoint_model is not None:
            opened = (self.connection.run(self.checkpoints.finetune()), False)
        else:
            opened = self.connection.run(
                open_adapter(self.client, plan, self.checkpoints.resumed, self._warn, self._info)
            )
        # Opening an adapter settles an ``auto`` dialect.
        return (*opened, self.client.dialect)

    @property
    def resumed_from(self) -> str | None:
        """The API checkpoint the adapter continues from, if a Lightning checkpoint gave one."""
        return self.checkpoints.resumed_from

    def resume(self, state: Mapping[str, Any]) -> None:
        """Continue from a Lightning checkpoint's API state when the adapter is next opened.

        See :meth:`Checkpoints.resume`.
        """
        self._adapter = None
        self.checkpoints.resume(state, self._evaluating_only)
        if self.prompt_filter is not None:
            self.prompt_filter.restore(state.get("prompt_streaks", {}))

    def check_training(self, lr: float | None) -> None:
        """Open the adapter for training, refusing what its dialect cannot do (on every rank).

        Raises:
            ValueError: If SFT or an ``lr`` is asked of a service speaking ``/adapters``.
        """
        self.adapter  # noqa: B018 - opened at once, so set-up errors surface at once
        wanted = [
            name
            for name, value in (
                ("sft_warmup_steps", self.options.sft_warmup_steps),
                ("sft_share", self.options.sft_share),
                ("lr", lr),
            )
            if value
        ]
        if wanted and self.dialect == "adapters":
            # Nothing was trained: an adapter made for this run goes with it.
            self._temporary = self._created
            raise ValueError(
                f"{', '.join(wanted)}: the service speaks the /adapters dialect, which has no "
                "SFT groups and no learning rate; unset them, or use a /finetunes service"
            )

    def release(self, wait: bool = True) -> None:
        """End a stage: delete an adapter made for it alone, then :meth:`close`."""
        try:
            if self._adapter is not None and self._temporary:
                self._delete_temporary(self._adapter.adapter_id)
        finally:
            self._evaluating_only = False
            self.close(wait)

    def _delete_temporary(self, adapter_id: str) -> None:
        self._adapter, self._temporary = None, False
        if not self.collective.is_zero:
            return
        try:
            self.connection.run(self.client.adapters.delete(adapter_id))
        except TuningAPIError as exc:
            self._warn(f"could not delete the evaluation adapter {adapter_id}: {exc}")

    def close(self, wait: bool = True) -> None:
        """Close the client, its event loop, and a local service this process serves.

        Args:
            wait: Wait for a pending train step first. Without waiting, a step still in
                flight is abandoned and counts as in doubt: no checkpoint is taken until
                the adapter is opened again (resume from an earlier checkpoint).
        """
        try:
            if wait:
                self.remote.settle()
            else:
                self.remote.abandon()
        finally:
            self._inference = None
            self.connection.shutdown()

    # Training -----------------------------------------------------------------------------

    @property
    def prompt_filter(self) -> PromptFilter | None:
        """Skips prompts whose recent groups had no spread (``skip_prompts``), else ``None``."""
        return self.teacher.prompt_filter

    def step(self, lr: float | None) -> StepReport:
        """Send one train step with every rank's groups at ``lr`` (on every rank).

        Every rank's rate limiter rides along; the step's report grants each its share
        of the key's rate for the next step.
        """
        self.remote.add(Shard(pace=self.connection.pace()))
        report = self.remote.step(self.collective, self.adapter.adapter_id, lr)
        self.connection.follow(report.key_rate)
        return report

    def drain(self) -> None:
        """Wait for the train step in flight, if any (on every rank)."""
        self.remote.drain(self.collective)

    # Evaluation ---------------------------------------------------------------------------

    def greedy_model(self, settings: Settings | None = None, *, scored: bool = True) -> GreedyModel:
        """What answers for the run (:meth:`Evaluator.greedy_model`)."""
        return self.evaluator.greedy_model(settings, scored=scored)

    def evaluate_batch(
        self, batch: Sequence[Sample], batch_idx: int, metrics: SkillMetrics
    ) -> list[Scored]:
        """Answer one batch greedily, score it, and add it to ``metrics``."""
        return self.evaluator.evaluate_batch(batch, batch_idx, metrics)

    def evaluate(
        self,
        batches: Iterable[Sequence[Sample]],
        *,
        progress: Callable[[int], None] | None = None,
        tallies: Sequence[Tally] = (),
    ) -> dict[str, float]:
        """Evaluate the adapter, with every train step applied, on every rank's batches.

        See :meth:`Evaluator.evaluate`: the results cover every process.
        """
        return self.evaluator.evaluate(batches, progress=progress, tallies=tallies)

    def generate(
        self, samples: Sequence[Sample], settings: Settings | None = None
    ) -> list[RolloutsResponse]:
        """One rollout per sample from the current adapter, in order (``eval_settings`` by default)."""
        return self.evaluator.generate(samples, settings)

    def predict(self, batch: Sequence[Sample], batch_idx: int) -> list[dict[str, Any]]:
        """One greedy rollout per sample: ``{"id", "skill", "label", "output"}`` records."""
        return self.evaluator.predict(batch, batch_idx)

    # API checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self, interrupted: bool = False) -> dict[str, Any] | None:
        """Save an API checkpoint: its state for a Lightning checkpoint, or ``None``.

        See :meth:`Checkpoints.save`; ``interrupted`` saves on rank 0 alone, then closes.
        With ``skip_prompts`` the state keeps the prompts' flat streaks too, so a resumed
        run skips as this one would have.
        """
        adapter = self._adapter
        state = self.checkpoints.save(None if adapter is None else adapter.adapter_id, interrupted)
        streaks = None if self.prompt_filter is None else self.prompt_filter.state()
        if state is not None and streaks:
            state["prompt_streaks"] = streaks
        return state

    def delete_checkpoint(self, checkpoint_id: str) -> None:
        """Delete an API checkpoint."""
        self.checkpoints.delete(checkpoint_id)
