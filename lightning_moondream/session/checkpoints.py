"""A session's API checkpoints: the one it resumes from, the one it evaluates, those it saves.

A Lightning checkpoint keeps an API checkpoint's state under ``"moondream"``. Resumed,
that state makes the adapter continue from it when next opened; given to a stage that
only evaluates, on ``/finetunes``, it names the inference model that answers instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from lightning_moondream.api import Adapter
from lightning_moondream.distributed import Collective
from lightning_moondream.session.adapter import save_checkpoint
from lightning_moondream.session.connection import Connection
from lightning_moondream.session.inference import checkpoint_model
from lightning_moondream.session.remote_step import AmbiguousTrainStepError, RemoteStep


class CheckpointingSession(Protocol):
    """What the checkpoints need of their session."""

    collective: Collective
    connection: Connection
    remote: RemoteStep

    def drain(self) -> None:
        """Wait for the train step in flight, if any (on every rank)."""
        ...

    def close(self, wait: bool = True) -> None:
        """Close the client, its event loop, and a local service this process serves."""
        ...


class Checkpoints:
    """The API checkpoints of a session's adapter.

    Args:
        session: The session whose adapter they save.
        info: Reports progress.
    """

    def __init__(self, session: CheckpointingSession, info: Callable[[str], None]) -> None:
        self._session = session
        self._info = info
        self.resumed: dict[str, Any] | None = None
        """The API state the adapter continues from when it is next opened, if any."""
        self.evaluated: dict[str, Any] | None = None
        """The API state of the checkpoint that evaluation stages answer with, if any."""
        self._saved: tuple[tuple[str, int, int], dict[str, Any]] | None = None

    @property
    def resumed_from(self) -> str | None:
        """The API checkpoint the adapter continues from, if a Lightning checkpoint gave one."""
        return None if self.resumed is None else self.resumed.get("checkpoint_id")

    def model(self, evaluating_only: bool) -> str | None:
        """The inference model answering for a checkpoint under evaluation, if any.

        A validate, test or predict stage given a ``/finetunes`` checkpoint evaluates it
        read-only as ``moondream3-preview/FT@STEP``: the finetune may have moved on, and
        a checkpoint cannot start one. Later evaluation stages without a checkpoint
        evaluate it too (as Lightning evaluates the weights it loaded), until ``fit``.

        Args:
            evaluating_only: Whether the stage only evaluates.
        """
        if not evaluating_only or self.evaluated is None:
            return None
        return checkpoint_model(self.evaluated)

    async def finetune(self) -> Adapter:
        """The finetune of the checkpoint under evaluation, read as it is (never reattached)."""
        assert self.evaluated is not None
        finetune = await self._session.connection.client.adapters.get(self.evaluated["adapter_id"])
        if finetune.train_steps is None:
            return finetune.model_copy(update={"train_steps": self.evaluated["train_steps"]})
        return finetune

    def resume(self, state: Mapping[str, Any], evaluating_only: bool) -> None:
        """Continue from a Lightning checkpoint's API state when the adapter is next opened.

        On ``/adapters`` a new adapter is created from the API checkpoint, so steps
        applied to the old adapter after it are not carried over and none is counted
        twice. On ``/finetunes`` ``fit`` goes on with the same finetune if it is still at
        the checkpoint's step (or, with ``resume_at_finetune_step``, where it stands);
        a stage that only evaluates answers with the checkpoint's inference model.

        Args:
            state: The API state a Lightning checkpoint keeps.
            evaluating_only: Whether the stage only evaluates.
        """
        self.resumed = dict(state)
        self.evaluated = dict(state) if evaluating_only else None
        model = self.model(evaluating_only)
        if model is not None:
            self._info(
                f"Evaluating checkpoint {state['checkpoint_id']} through the inference API as "
                f"{model} (read-only: finetune {state['adapter_id']} is left as it is)"
            )

    def save(self, adapter_id: str | None, interrupted: bool = False) -> dict[str, Any] | None:
        """Save an API checkpoint: its state for a Lightning checkpoint, or ``None``.

        One API checkpoint stands for one state of the adapter: saved again at the same
        step, the same checkpoint is given. ``None`` before an adapter is open, and on
        ranks other than 0 of an interrupted run.

        Args:
            adapter_id: The open adapter, or ``None`` before one is.
            interrupted: The run stopped on an error: other ranks may be gone, so no
                collective is used, only rank 0 saves, and the session closes after.

        Raises:
            AmbiguousTrainStepError: If the last train step may or may not have been
                applied: no checkpoint can then pair the run's step with the adapter's.
        """
        session = self._session
        try:
            if adapter_id is None:
                return None
            if interrupted:
                if not session.collective.is_zero:
                    return None
                session.remote.settle()
                return self._state(adapter_id)
            session.drain()
            return session.collective.on_zero(lambda: self._state(adapter_id))
        finally:
            if interrupted:
                session.close()

    def _state(self, adapter_id: str) -> dict[str, Any]:
        remote = self._session.remote
        if remote.in_doubt:
            raise AmbiguousTrainStepError(
                f"not checkpointing: the trainer counted train step {remote.train_steps + 1} "
                f"but adapter {adapter_id} may not have it; resume from an earlier checkpoint"
            )
        counts = (adapter_id, remote.train_steps, remote.skipped_steps)
        if self._saved is None or self._saved[0] != counts:
            connection = self._session.connection
            self._saved = (counts, connection.run(save_checkpoint(connection.client, *counts)))
        return dict(self._saved[1])

    def delete(self, checkpoint_id: str) -> None:
        """Delete an API checkpoint."""
        if self._saved is not None and self._saved[1]["checkpoint_id"] == checkpoint_id:
            self._saved = None
        connection = self._session.connection
        connection.run(connection.client.checkpoints.delete(checkpoint_id))
