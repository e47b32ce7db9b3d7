"""The session layer: one adapter on a tuning service, trained and evaluated, without Lightning.

``MoondreamRLModule`` is Lightning's face of a :class:`Session`; the ``evaluate`` and
``adapters`` commands use its evaluation loop and its rule for choosing the service.
Nothing here imports Lightning (``torch.distributed`` carries the collectives).

- :mod:`~lightning_moondream.session.service`: the one rule choosing the service.
- :mod:`~lightning_moondream.session.connection`: the client and its event loop.
- :mod:`~lightning_moondream.session.adapter`: opening, resuming and saving the adapter.
- :mod:`~lightning_moondream.session.sampling`: rollouts requested and scored.
- :mod:`~lightning_moondream.session.signal`: prompts skipped ahead of sampling when their
  recent groups had no reward spread, and steps topped up with more groups that spread.
- :mod:`~lightning_moondream.session.remote_step`: one train step per global step.
- :mod:`~lightning_moondream.session.evaluation`: the one evaluation loop.
- :mod:`~lightning_moondream.session.teaching`: each batch sampled and scored into a shard.
- :mod:`~lightning_moondream.session.checkpoints`: the API checkpoints resumed, evaluated, saved.
- :mod:`~lightning_moondream.session.evaluator`: what answers for the run, its answers scored.
- :mod:`~lightning_moondream.session.session`: :class:`Session`, which holds them together.
"""

from lightning_moondream.session.adapter import CHECKPOINT_KEY, ResumeMismatchError
from lightning_moondream.session.evaluation import BenchmarkTally, EvaluationLoop, Scored, Tally
from lightning_moondream.session.options import SessionOptions
from lightning_moondream.session.remote_step import (
    AmbiguousTrainStepError,
    RemoteStep,
    Shard,
    StepReport,
    TrainStepFailedError,
)
from lightning_moondream.session.sampling import GreedyModel, tuning_model
from lightning_moondream.session.service import (
    LOCAL_SERVICE_DIR,
    NoLocalServiceDataError,
    ServiceChoice,
)
from lightning_moondream.session.session import Session
from lightning_moondream.session.signal import PromptFilter, SkipRule

__all__ = [
    "CHECKPOINT_KEY",
    "LOCAL_SERVICE_DIR",
    "AmbiguousTrainStepError",
    "BenchmarkTally",
    "EvaluationLoop",
    "GreedyModel",
    "NoLocalServiceDataError",
    "PromptFilter",
    "RemoteStep",
    "ResumeMismatchError",
    "Scored",
    "ServiceChoice",
    "Session",
    "SessionOptions",
    "Shard",
    "SkipRule",
    "StepReport",
    "Tally",
    "TrainStepFailedError",
    "tuning_model",
]
