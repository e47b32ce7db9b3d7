"""A session's answers: what answers for the run, and its answers scored.

Validation, test and ``evaluate`` answer greedily and score with the session's scorer;
``generate`` and ``predict`` only answer. What answers is the checkpoint's inference
model where one does (a stage evaluating a ``/finetunes`` checkpoint), else the current
adapter's greedy rollouts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from lightning_moondream.api import Adapter, RolloutsResponse, Settings
from lightning_moondream.api.inference import AsyncInferenceClient
from lightning_moondream.distributed import Collective
from lightning_moondream.metrics import SkillMetrics
from lightning_moondream.scoring import Sample, Scorer
from lightning_moondream.session.connection import Connection
from lightning_moondream.session.evaluation import EvaluationLoop, Scored, Tally
from lightning_moondream.session.inference import inference_model
from lightning_moondream.session.options import SessionOptions
from lightning_moondream.session.sampling import GreedyModel, check_batch, encoded, tuning_model


class EvaluatingSession(Protocol):
    """What evaluation needs of its session."""

    options: SessionOptions
    scorer: Scorer
    collective: Collective
    connection: Connection

    @property
    def adapter(self) -> Adapter:
        """The adapter, opened on first use (on every rank)."""
        ...

    @property
    def inference(self) -> AsyncInferenceClient:
        """The inference API's client, bound to the tuning client's service."""
        ...

    @property
    def checkpoint_model(self) -> str | None:
        """The inference model answering for a checkpoint under evaluation, if any."""
        ...

    def drain(self) -> None:
        """Wait for the train step in flight, if any (on every rank)."""
        ...


class Evaluator:
    """Answers samples for a session, greedily, and scores the answers.

    Args:
        session: The session whose adapter (or checkpoint) answers.
    """

    def __init__(self, session: EvaluatingSession) -> None:
        self._session = session

    def greedy_model(self, settings: Settings | None = None, *, scored: bool = True) -> GreedyModel:
        """What answers for the run as a :data:`GreedyModel` (``eval_settings`` by default).

        The checkpoint's inference model where one answers (``checkpoint_model``), else
        the current adapter's rollouts.

        Args:
            settings: Generation settings.
            scored: Send ground truth where the scorer uses the service's rewards.
        """
        session = self._session
        options = session.options
        settings = options.evaluation if settings is None else settings
        model = session.checkpoint_model
        # Paced as training is, once the key's admitted rate and the latency are known.
        in_flight = session.connection.in_flight
        if model is not None:
            return inference_model(
                session.inference, model, settings, options.max_concurrency, in_flight
            )
        return tuning_model(
            session.connection.client,
            session.adapter.adapter_id,
            settings,
            session.scorer if scored else None,
            options.max_concurrency,
            in_flight,
        )

    def evaluate_batch(
        self, batch: Sequence[Sample], batch_idx: int, metrics: SkillMetrics
    ) -> list[Scored]:
        """Answer one batch greedily, score it, and add it to ``metrics``."""
        samples = encoded(check_batch(batch, batch_idx))
        loop = EvaluationLoop(self.greedy_model(), self._session.scorer, metrics)
        return self._session.connection.run(loop.answer(samples))

    def evaluate(
        self,
        batches: Iterable[Sequence[Sample]],
        *,
        progress: Callable[[int], None] | None = None,
        tallies: Sequence[Tally] = (),
    ) -> dict[str, float]:
        """Evaluate the adapter, with every train step applied, on every rank's batches.

        Args:
            batches: This rank's batches.
            progress: Called with the samples done after each batch.
            tallies: Further scores to keep.

        Returns:
            The metrics of ``SkillMetrics`` plus ``reward`` and ``samples``, over every
            process.
        """
        session = self._session
        session.drain()
        loop = EvaluationLoop(self.greedy_model(), session.scorer, SkillMetrics(), tallies)
        for index, batch in enumerate(batches):
            session.connection.run(loop.answer(encoded(check_batch(batch, index))))
            if progress is not None:
                progress(len(loop.rewards))
        return loop.results(session.collective.all_gather)

    def generate(
        self, samples: Sequence[Sample], settings: Settings | None = None
    ) -> list[RolloutsResponse]:
        """One rollout per sample from the current adapter, in order (``eval_settings`` by default)."""
        model = self.greedy_model(settings, scored=False)
        return self._session.connection.run(model(encoded(samples)))

    def predict(self, batch: Sequence[Sample], batch_idx: int) -> list[dict[str, Any]]:
        """One greedy rollout per sample: ``{"id", "skill", "label", "output"}`` records."""
        samples = check_batch(batch, batch_idx)
        return [
            {
                "id": sample.id,
                "skill": sample.skill,
                "label": sample.label,
                "output": response.rollouts[0].output,
            }
            for sample, response in zip(samples, self.generate(samples), strict=True)
        ]
