"""The ``/finetunes`` dialect's own rules, over the service's adapters.

Moondream's API reference adds to the ``/adapters`` spec:

- names of letters, digits, dots, hyphens and underscores, unique per owner: creating a
  finetune whose name exists returns the existing one if the rank is the same (so a
  creation of unknown outcome is resolved by sending it again), and is a conflict (409)
  if not;
- idempotent deletes: deleting a finetune or a checkpoint again answers as the first
  time did. What never existed (or is another key's) is still 404, and so is a
  checkpoint of a deleted finetune: its checkpoints went with it;
- checkpoints addressed by the train step they were saved at.
"""

from __future__ import annotations

import threading

import anyio.to_thread

from lightning_moondream.api.limits import FINETUNE_RANKS
from lightning_moondream.server.errors import ServiceError
from lightning_moondream.server.service import Service
from lightning_moondream.server.store import AdapterRecord
from lightning_moondream.server.validation import check_finetune_name, check_rank


class Finetunes:
    """Finetunes: the service's adapters under the ``/finetunes`` dialect's rules.

    Args:
        service: The service whose adapters they are.
    """

    def __init__(self, service: Service) -> None:
        self.service = service
        # Looking a name up and creating it must be one step, or two concurrent
        # creations of one name would make two finetunes.
        self._creation_lock = threading.Lock()

    async def create(self, owner: str, name: str, rank: int) -> AdapterRecord:
        """The owner's finetune of this name: the existing one, else a new one.

        Raises:
            ServiceError: 422 for a bad name or rank, 409 if the name exists with
                another rank.
        """
        check_finetune_name(name)
        check_rank(rank, FINETUNE_RANKS)
        store = self.service.store

        def create() -> AdapterRecord:
            with self._creation_lock:
                existing = store.find_adapter_named(owner, name)
                if existing is None:
                    state = self.service.fresh_state(rank)
                    return store.create_adapter(owner, name, rank, state.to_dict())
            if existing.rank != rank:
                raise ServiceError(
                    409,
                    f"name: a finetune named {name!r} already exists with rank {existing.rank}",
                )
            return existing

        return await anyio.to_thread.run_sync(create)

    async def delete(self, owner: str, finetune_id: str) -> None:
        """Delete the owner's finetune; again, nothing happens.

        Raises:
            ServiceError: 404 unless the owner has, or had, this finetune.
        """
        try:
            await self.service.delete_adapter(owner, finetune_id)
        except ServiceError as exc:
            # Checked after the attempt, so a delete racing another one also succeeds.
            if exc.status != 404 or not self.service.store.was_deleted(owner, finetune_id):
                raise

    def delete_checkpoints_at_step(self, owner: str, finetune_id: str, step: int) -> None:
        """Delete the finetune's checkpoints saved at train step ``step``; again, nothing happens.

        Raises:
            ServiceError: 404 for an unknown or deleted finetune, or if no checkpoint was
                ever saved at that step.
        """
        service = self.service
        service.get_adapter(owner, finetune_id)
        deleted = 0
        while (record := service.store.checkpoint_at_step(owner, finetune_id, step)) is not None:
            deleted += service.store.delete_checkpoint(owner, record.checkpoint_id)
        if not deleted and not service.store.was_deleted_at_step(owner, finetune_id, step):
            raise ServiceError(404, f"no checkpoint of finetune {finetune_id!r} at step {step}")
