"""The local tuning service's domain: adapters, checkpoints, metrics, rollouts, train steps.

Free of HTTP: methods take plain values and return records, plain results
(``results``) or raise ``ServiceError`` with the API's status and message. The routes of
both dialects (``routes_adapters``, ``routes_finetunes``) translate HTTP to these calls
and back, so an adapter is one and the same thing through either dialect (a finetune id
is its adapter id).

Model work runs in worker threads, never on the event loop. Train steps on one adapter
are serialized by a per-adapter lock; a rollout reads the adapter state current when it
starts, and a train step swaps in a complete new state when it ends, so a rollout never
sees a half-updated adapter.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import anyio.to_thread

from lightning_moondream.api.limits import ADAPTER_RANKS
from lightning_moondream.rewards import ground_truth_reward
from lightning_moondream.server import signing
from lightning_moondream.server.engine import AdapterState, Engine
from lightning_moondream.server.errors import ServiceError
from lightning_moondream.server.grpo import TrainGroups
from lightning_moondream.server.results import RolloutBatch, SampledRollout, StepReport
from lightning_moondream.server.sampling import Seeds, generate, sign_rollouts, task_of
from lightning_moondream.server.states import AdapterStates
from lightning_moondream.server.store import AdapterRecord, CheckpointRecord, Store, is_adapter_id
from lightning_moondream.server.training import engine_groups, verify_groups
from lightning_moondream.server.validation import (
    ParsedRequest,
    check_ground_truth,
    check_metrics,
    check_rank,
    check_rollout_count,
    parse_skill_request,
)

ResultT = TypeVar("ResultT")


async def _in_thread(work: Callable[[], ResultT]) -> ResultT:
    """Run blocking work (model, files, locks) in a worker thread."""
    return await anyio.to_thread.run_sync(work)


class Service:
    """The service's state and operations: store, engine, adapter states, owners.

    Args:
        store: Adapters, checkpoints and metrics on disk.
        engine: The model behind the API.
        api_keys: Accepted keys; ``None`` accepts any non-empty key.
        max_pixels: Largest decoded image accepted, in pixels.
        seed: Seed of sampling and adapter initialization.
        checkpoint_retention: Seconds a checkpoint is kept; ``None`` for ever.
        owner_key: Every accepted key acts for the owner of this key.
    """

    def __init__(
        self,
        store: Store,
        engine: Engine,
        api_keys: Collection[str] | None,
        max_pixels: int,
        seed: int,
        checkpoint_retention: float | None = None,
        owner_key: str | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.max_pixels = max_pixels
        self.checkpoint_retention_ms = (
            None if checkpoint_retention is None else round(checkpoint_retention * 1000)
        )
        self.owners = None if api_keys is None else {self._owner(key) for key in api_keys}
        self._acting_owner = None if owner_key is None else self._owner(owner_key)
        self._seeds = Seeds(seed)
        self._states = AdapterStates(
            lambda adapter_id: AdapterState.from_dict(
                store.load_state(store.adapter_path(adapter_id))
            )
        )

    @staticmethod
    def _owner(key: str) -> str:
        # Rows are keyed by a digest of the key: the key itself is never stored.
        return hashlib.sha256(key.encode()).hexdigest()

    def authenticate(self, api_key: str) -> str:
        """The owner id an API key acts for.

        Raises:
            ServiceError: 401 for a key that is not accepted.
        """
        owner = self._owner(api_key)
        if self.owners is not None and not any(
            hmac.compare_digest(owner, known) for known in self.owners
        ):
            raise ServiceError(401, "invalid API key")
        return self._acting_owner or owner

    def train_lock(self, adapter_id: str) -> threading.Lock:
        """The lock serializing train steps of one adapter."""
        return self._states.train_lock(adapter_id)

    def state(self, adapter_id: str) -> AdapterState:
        """The adapter's current state; blocking (it may read the weight file)."""
        return self._states.get(adapter_id)

    def fresh_state(self, rank: int) -> AdapterState:
        """A new adapter's initial state, seeded from the service's seeded stream."""
        return self.engine.new_adapter(rank, self._seeds.fresh())

    def parse_request(self, raw: Any, where: str) -> ParsedRequest:
        """Validate a skill request as the client does (see ``validation``).

        Raises:
            ServiceError: 400 for an unreadable image, 422 naming any other bad field.
        """
        return parse_skill_request(raw, where, self.max_pixels)

    # Adapters ------------------------------------------------------------------------

    def get_adapter(self, owner: str, adapter_id: str) -> AdapterRecord:
        """The owner's adapter.

        Raises:
            ServiceError: 404 unless the owner has this adapter.
        """
        record = self.store.get_adapter(owner, adapter_id)
        if record is None:
            raise ServiceError(404, f"adapter {adapter_id!r} not found")
        return record

    async def create_adapter(
        self,
        owner: str,
        name: str,
        rank: int,
        from_checkpoint: str | None = None,
        ranks: Collection[int] = ADAPTER_RANKS,
    ) -> AdapterRecord:
        """Create an adapter, fresh or from one of the owner's checkpoints.

        Args:
            owner: The caller's owner id.
            name: The adapter's name.
            rank: Its LoRA rank, one of ``ranks``.
            from_checkpoint: Full id of a checkpoint to start from.
            ranks: The ranks accepted.

        Raises:
            ServiceError: 422 for a bad rank, 404 for an unknown checkpoint.
        """
        check_rank(rank, ranks)
        if from_checkpoint is None:
            state = self.fresh_state(rank)
        else:
            if self.store.get_checkpoint(owner, from_checkpoint) is None:
                raise ServiceError(
                    404, f"from_checkpoint: checkpoint {from_checkpoint!r} not found"
                )
            state = await _in_thread(lambda: self._load_checkpoint(from_checkpoint))
            if state.rank != rank:
                raise ServiceError(
                    422,
                    f"rank: {rank} differs from the rank {state.rank} of checkpoint {from_checkpoint}",
                )
        return await _in_thread(
            lambda: self.store.create_adapter(owner, name, rank, state.to_dict())
        )

    async def read_adapter(self, owner: str, adapter_id: str) -> AdapterRecord:
        """The owner's adapter, its train steps counting a step still running.

        Raises:
            ServiceError: 404 unless the owner has this adapter.
        """

        def read() -> AdapterRecord:
            self.get_adapter(owner, adapter_id)
            # A client that gave up waiting for a train step reads train_steps back to
            # learn whether it was applied: a step still running must be counted, so the
            # read waits for it instead of racing it.
            with self.train_lock(adapter_id):
                return self.get_adapter(owner, adapter_id)

        return await _in_thread(read)

    def list_adapters(self, owner: str, limit: int, after: int) -> tuple[list[AdapterRecord], bool]:
        """The owner's adapters created after position ``after``, oldest first; and whether more follow."""
        return self.store.list_adapters(owner, limit, after)

    async def delete_adapter(self, owner: str, adapter_id: str) -> None:
        """Delete the owner's adapter with its checkpoints and metrics.

        Raises:
            ServiceError: 404 unless the owner has this adapter.
        """

        def delete() -> bool:
            # Wait for a running train step, so it cannot write the files back afterwards.
            with self.train_lock(adapter_id):
                return self.store.delete_adapter(owner, adapter_id)

        if not is_adapter_id(adapter_id) or not await _in_thread(delete):
            raise ServiceError(404, f"adapter {adapter_id!r} not found")
        self._states.forget(adapter_id)

    # Checkpoints and metrics ---------------------------------------------------------

    async def save_checkpoint(self, owner: str, adapter_id: str) -> CheckpointRecord:
        """Save the adapter's current state as a checkpoint at its current step.

        Raises:
            ServiceError: 404 unless the owner has this adapter.
        """

        def save() -> CheckpointRecord:
            # Under the train lock, the state and its step count belong together.
            with self.train_lock(adapter_id):
                record = self.get_adapter(owner, adapter_id)
                return self.store.create_checkpoint(
                    owner,
                    adapter_id,
                    self.state(adapter_id).to_dict(),
                    step=record.train_steps,
                    retention_ms=self.checkpoint_retention_ms,
                )

        return await _in_thread(save)

    def list_checkpoints(
        self, owner: str, adapter_id: str, limit: int, after: int
    ) -> tuple[list[CheckpointRecord], bool]:
        """The adapter's checkpoints saved after position ``after``; and whether more follow.

        Raises:
            ServiceError: 404 unless the owner has this adapter.
        """
        self.get_adapter(owner, adapter_id)
        return self.store.list_checkpoints(owner, adapter_id, limit, after)

    def delete_checkpoint(self, owner: str, adapter_id: str, checkpoint_id: str) -> None:
        """Delete one of the adapter's checkpoints by id, short (``chk_001``) or full.

        Raises:
            ServiceError: 404 unless the owner has this checkpoint of this adapter.
        """
        full_id = checkpoint_id if "/" in checkpoint_id else f"{adapter_id}/{checkpoint_id}"
        if not full_id.startswith(f"{adapter_id}/") or not self.store.delete_checkpoint(
            owner, full_id
        ):
            raise ServiceError(404, f"checkpoint {full_id!r} not found")

    async def checkpoint_state(self, owner: str, adapter_id: str, step: int) -> AdapterState:
        """The weights of the adapter's latest checkpoint at train step ``step``, read-only.

        What inference with a saved checkpoint samples from (see ``sample``).

        Raises:
            ServiceError: 404 for an unknown adapter, or no checkpoint at that step.
        """
        self.get_adapter(owner, adapter_id)
        record = self.store.checkpoint_at_step(owner, adapter_id, step)
        if record is None:
            raise ServiceError(404, f"no checkpoint of finetune {adapter_id!r} at step {step}")
        return await _in_thread(lambda: self._load_checkpoint(record.checkpoint_id))

    def _load_checkpoint(self, checkpoint_id: str) -> AdapterState:
        path = self.store.checkpoint_path(checkpoint_id)
        return AdapterState.from_dict(self.store.load_state(path))

    def log_metrics(self, owner: str, adapter_id: str, step: int, metrics: dict[str, Any]) -> int:
        """Store the adapter's metrics of a step; how many were stored.

        Raises:
            ServiceError: 422 naming a bad metric (checked first), 404 for an unknown adapter.
        """
        checked = check_metrics(metrics)
        self.get_adapter(owner, adapter_id)
        return self.store.log_metrics(adapter_id, step, checked)

    def read_metrics(self, owner: str, adapter_id: str) -> list[dict[str, Any]]:
        """Every metric logged for the adapter, by step then name.

        Raises:
            ServiceError: 404 for an unknown adapter.
        """
        self.get_adapter(owner, adapter_id)
        return self.store.list_metrics(adapter_id)

    # Rollouts and train steps --------------------------------------------------------

    async def sample(
        self, state: AdapterState, parsed: ParsedRequest, count: int, seed: int | None = None
    ) -> list[SampledRollout]:
        """Sample ``count`` unsigned answers to a validated request from ``state``, read-only.

        For inference with a checkpoint: ``checkpoint_state`` gives ``state``,
        ``parse_request`` gives ``parsed``.

        Args:
            state: The adapter state to sample from (not modified).
            parsed: The validated request; its settings steer decoding.
            count: How many answers.
            seed: Seed of the sampling; a fresh one from the service's stream if ``None``.

        Raises:
            ServiceError: 400 for an unreadable image.
        """
        draw = self._seeds.fresh() if seed is None else seed
        return await _in_thread(
            lambda: generate(self.engine, state, parsed, count, draw, self.max_pixels)
        )

    async def sample_rollouts(
        self,
        owner: str,
        adapter_id: str,
        num_rollouts: int,
        raw_request: dict[str, Any],
        raw_ground_truth: dict[str, Any] | None,
    ) -> RolloutBatch:
        """Sample signed rollouts of a request, with server rewards if ground truth is given.

        Raises:
            ServiceError: 422 for an invalid field, 400 for an unreadable image, 404 for
                an unknown adapter.
        """
        check_rollout_count(num_rollouts)
        parsed = self.parse_request(raw_request, "request")
        ground_truth = check_ground_truth(parsed.skill, raw_ground_truth)
        record = self.get_adapter(owner, adapter_id)
        digest = signing.request_digest(raw_request)
        seed = self._seeds.for_rollouts(record, digest)

        def sample() -> list[SampledRollout]:
            state = self.state(adapter_id)
            unsigned = generate(self.engine, state, parsed, num_rollouts, seed, self.max_pixels)
            return sign_rollouts(unsigned, self.store.secret, adapter_id, digest)

        rollouts = await _in_thread(sample)
        rewards = None
        if ground_truth is not None:
            truth = ground_truth.model_dump(mode="json", exclude_none=True)
            rewards = [ground_truth_reward(parsed.skill, item.output, truth) for item in rollouts]
        return RolloutBatch(rollouts, rewards)

    async def train_step(
        self, owner: str, adapter_id: str, groups: Sequence[Any], lr: float | None
    ) -> StepReport:
        """Verify a train step's groups and apply it; at ``lr`` 0 compute it but change nothing.

        A dialect whose wire takes fewer groups refuses the others before calling this.

        Args:
            owner: The caller's owner id.
            adapter_id: The adapter to train.
            groups: The body's groups as sent (see ``training.verify_groups``).
            lr: The checked learning rate; the engine's default if ``None``.

        Raises:
            ServiceError: 404 for an unknown adapter (checked before the groups, and if
                it is deleted meanwhile), 422 naming a bad group field, 400 for a
                changed or foreign rollout.
        """
        self.get_adapter(owner, adapter_id)
        verified = verify_groups(groups, self.store.secret, adapter_id, self.max_pixels)
        report = await _in_thread(lambda: self._apply(owner, adapter_id, verified, lr))
        if report is None:
            raise ServiceError(404, f"adapter {adapter_id!r} not found")
        return report

    def _apply(
        self, owner: str, adapter_id: str, verified: TrainGroups[ParsedRequest], lr: float | None
    ) -> StepReport | None:
        """Apply a verified step under the adapter's train lock; ``None`` if it was deleted."""
        with self.train_lock(adapter_id):
            state = self.state(adapter_id)
            groups = engine_groups(
                verified, lambda parsed: task_of(parsed, self.max_pixels, self.engine.reads_pixels)
            )
            new_state, stats = self.engine.train(state, groups, lr)
            if lr == 0:
                record = self.store.get_adapter(owner, adapter_id)
                if record is None:
                    return None
                return StepReport.of(record.train_steps, False, stats, verified.rewards)
            if not self.store.record_train_step(adapter_id, new_state.to_dict()):
                return None
            self._states.remember(adapter_id, new_state)
            record = self.store.get_adapter(owner, adapter_id)
            steps = record.train_steps if record is not None else 0
            return StepReport.of(steps, True, stats, verified.rewards)
