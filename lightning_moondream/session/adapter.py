"""The adapter's life: opened (created, attached, resumed or reattached), and API checkpoints.

An API checkpoint's state is what a Lightning checkpoint keeps under ``"moondream"``:
ids and counts, never the key. It is a plain dict, so checkpoints of earlier versions,
which lack some of its keys, still load.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lightning_moondream.api import Adapter, AsyncTuningClient

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "moondream"
"""Key of the API state (adapter and checkpoint ids, never the key) in Lightning checkpoints."""


class ResumeMismatchError(RuntimeError):
    """A finetune is no longer at the step of the checkpoint a run resumes from."""


@dataclass(frozen=True)
class AdapterPlan:
    """Which adapter a session opens when none is given by a checkpoint.

    Attributes:
        name: Name of an adapter to create.
        rank: LoRA rank of an adapter to create.
        adapter_id: Attach to this existing adapter instead of creating one.
        from_checkpoint: Create the adapter from this API checkpoint.
        resume_at_finetune_step: On ``/finetunes``, resume a finetune that went on past
            the checkpoint (a run that stopped after saving it) where it stands.
    """

    name: str
    rank: int
    adapter_id: str | None = None
    from_checkpoint: str | None = None
    resume_at_finetune_step: bool = False


async def open_adapter(
    client: AsyncTuningClient,
    plan: AdapterPlan,
    resume: Mapping[str, Any] | None,
    warn: Callable[[str], None],
    info: Callable[[str], None] = logger.info,
) -> tuple[Adapter, bool]:
    """The adapter to use, and whether it was created for this run.

    Args:
        client: The client of the service.
        plan: The adapter the run asks for.
        resume: The API state of the checkpoint the run resumes from, if any.
        warn: Says what cannot be checked now.
        info: Says where a resumed finetune goes on from.
    """
    adapters = client.adapters
    if resume is not None and resume.get("dialect") == "finetunes":
        ahead = info if plan.resume_at_finetune_step else None
        return await reattach(client, resume, warn, ahead), False
    if resume is not None:
        return await adapters.create(plan.name, plan.rank, resume["checkpoint_id"]), True
    if plan.adapter_id is not None:
        return await adapters.get(plan.adapter_id), False
    return await create(client, plan, warn)


CLOCK_SKEW_MS = 60_000
"""How far the service's clock may run behind this machine's when telling new from old."""


async def create(
    client: AsyncTuningClient, plan: AdapterPlan, warn: Callable[[str], None]
) -> tuple[Adapter, bool]:
    """Create the run's adapter, and whether it is new.

    On ``/finetunes`` a name names one finetune: creating under a name in use hands back
    that finetune. One whose step the service reports goes on from that step (said
    through ``warn``); one whose step it does not report (Moondream Cloud) cannot be
    counted on from, so the run stops before anything is sent.

    Raises:
        ValueError: If the name is a finetune's whose step cannot be read.
    """
    started_ms = time.time() * 1000
    adapter = await client.adapters.create(plan.name, plan.rank, plan.from_checkpoint)
    if client.dialect != "finetunes":
        return adapter, True
    finetune = await client.adapters.get(adapter.adapter_id)
    if finetune.train_steps:
        warn(
            f"a finetune named {plan.name!r} exists ({finetune.adapter_id}, at step "
            f"{finetune.train_steps}): this run goes on training it; a /finetunes name "
            "names one finetune, so choose another name for a fresh one"
        )
        return finetune, False
    created_ms = finetune.created_at_ms
    if finetune.train_steps is None and created_ms and created_ms < started_ms - CLOCK_SKEW_MS:
        raise ValueError(
            f"name {plan.name!r}: a finetune of that name exists ({finetune.adapter_id}) and "
            "the service does not report its step, so a run cannot count on from it; "
            "choose another name, or resume from one of its Lightning checkpoints"
        )
    return finetune, True


async def reattach(
    client: AsyncTuningClient,
    state: Mapping[str, Any],
    warn: Callable[[str], None],
    go_on_ahead: Callable[[str], None] | None = None,
) -> Adapter:
    """Resume on ``/finetunes``, which cannot create a finetune from a checkpoint.

    The same finetune goes on where it is exactly at the checkpoint's step, so no step
    is counted twice or lost. Given ``go_on_ahead``, a finetune that went on past the
    checkpoint (its run stopped after saving it) goes on from the step it reports, said
    through ``go_on_ahead``: the steps it has are counted once, and never sent again.

    Raises:
        ResumeMismatchError: If the finetune reports another step than the checkpoint's
            (only a step below it, given ``go_on_ahead``).
    """
    finetune = await client.adapters.get(state["adapter_id"])
    if finetune.train_steps is None:
        # Moondream Cloud does not report a finetune's step: the first train step's
        # answer does, and a finetune that moved on stops the run then (or, given
        # go_on_ahead, the count goes on from the step it answers).
        then = "goes on from the step it answers" if go_on_ahead else "stops the run"
        warn(
            f"finetune {finetune.adapter_id} does not report its step; resuming at the "
            f"checkpoint's step {state['train_steps']}, checked by the first train step "
            f"(a finetune found past it {then})"
        )
        return finetune.model_copy(update={"train_steps": state["train_steps"]})
    ahead = finetune.train_steps - state["train_steps"]
    if ahead > 0 and go_on_ahead is not None:
        go_on_ahead(
            f"finetune {finetune.adapter_id} is at train step {finetune.train_steps}, {ahead} "
            f"past the checkpoint's step {state['train_steps']}: going on from step "
            f"{finetune.train_steps} (resume_at_finetune_step); those {ahead} steps stay "
            "applied and are not sent again"
        )
        return finetune
    if ahead:
        hint = (
            ""
            if ahead < 0
            else " (or set resume_at_finetune_step=True to go on from the finetune's own step)"
        )
        raise ResumeMismatchError(
            f"cannot resume finetune {finetune.adapter_id}: the checkpoint was taken at train "
            f"step {state['train_steps']} but the finetune reports {finetune.train_steps}. "
            "The /finetunes API cannot start a finetune from a checkpoint; resume from the "
            f"checkpoint whose step matches{hint}, or start a new run (its inference model "
            f"{state.get('model_id') or state['checkpoint_id']} stays usable, and validate, "
            "test and predict of this checkpoint use it)."
        )
    return finetune


async def save_checkpoint(
    client: AsyncTuningClient, adapter_id: str, train_steps: int, skipped_steps: int
) -> dict[str, Any]:
    """Save one API checkpoint of the adapter; its state for a Lightning checkpoint."""
    # The client resolves a save of unknown outcome by listing, so this is the one
    # checkpoint the save made.
    saved = await client.checkpoints.save(adapter_id)
    return {
        "adapter_id": adapter_id,
        "checkpoint_id": saved.ref,
        "model_id": saved.model_id,
        "dialect": client.dialect,
        "train_steps": train_steps,
        "skipped_steps": skipped_steps,
    }
