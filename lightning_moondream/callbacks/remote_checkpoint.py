"""``RemoteCheckpoint``: a ``ModelCheckpoint`` that keeps API checkpoints in step with files."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_moondream.api import NotFoundError, TuningAPIError, inference_model_id
from lightning_moondream.module import MoondreamRLModule
from lightning_moondream.session import CHECKPOINT_KEY


class RemoteCheckpoint(ModelCheckpoint):
    """Save checkpoints the Lightning way, each paired with an API checkpoint.

    Every file it writes holds the id of the API checkpoint saved with it (the
    ``MoondreamRLModule`` saves one per state of the adapter, however many files hold
    it). When this callback deletes a file (top-k, or an overwritten ``last.ckpt``), it
    deletes that API checkpoint too, unless ``keep_remote=True`` or another kept file
    holds it.

    It learns which API checkpoint a save holds from the checkpoint itself (its
    ``on_save_checkpoint`` sees the dict the module fills), and which files were written
    or removed by comparing the files it keeps before and after each of
    ``ModelCheckpoint``'s saving hooks.

    With ``save_last``, ``last.ckpt`` is written at every point where a checkpoint may be
    saved, so it always holds the latest such step, also when the top-k file is not
    replaced (``ModelCheckpoint`` alone refreshes it only with a top-k file). On
    ``/finetunes`` the finetune's latest API checkpoint is never deleted: without it the
    finetune cannot be trained further. A resumed run reads which API checkpoint each
    kept file holds from the files themselves.

    Args:
        keep_remote: Keep API checkpoints when their files are deleted.
        **kwargs: Arguments of ``ModelCheckpoint`` (``monitor``, ``mode``,
            ``save_top_k``, ``save_last``, ...).
    """

    def __init__(self, *, keep_remote: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_remote = keep_remote
        self.api_checkpoints: dict[str, str] = {}
        """API checkpoint id of each file this callback saved and still keeps."""
        self._saving: list[dict[str, Any]] = []
        self._latest: dict[str, Any] | None = None
        """The API state of the latest save, so the finetune's latest checkpoint is kept."""
        self._save_point = False

    @property
    def best_api_checkpoint_id(self) -> str | None:
        """The API checkpoint of the best model so far, ready for ``from_checkpoint``."""
        return self.api_checkpoints.get(self.best_model_path)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The module's own hook runs after the callbacks' and fills this dict.
        self._saving.append(checkpoint)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        kept = self._kept()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._follow(trainer, kept)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        kept = self._kept()
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer)
        self._follow(trainer, kept)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        kept = self._kept()
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer)
        self._follow(trainer, kept)

    @override
    def _save_topk_checkpoint(
        self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]
    ) -> None:
        # Called at every point where a checkpoint may be saved, whether one is or not.
        self._save_point = True
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` at a save point where no top-k file was written."""
        save_point, self._save_point = self._save_point, False
        if save_point and self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _kept(self) -> dict[str, Any]:
        """Every file kept now, with what says it was written again (its top-k score)."""
        kept: dict[str, Any] = dict(self.best_k_models)
        for path in (self.best_model_path, self.last_model_path):
            if path:
                kept.setdefault(path, None)
        self._saving = []
        return kept

    def _follow(self, trainer: pl.Trainer, before: dict[str, Any]) -> None:
        """Pair the files written since ``before`` with their API checkpoint; drop removed ones."""
        saved = [
            checkpoint[CHECKPOINT_KEY]
            for checkpoint in self._saving
            if CHECKPOINT_KEY in checkpoint
        ]
        self._saving = []
        self._save_point = False
        after = self._kept()
        orphans: set[str | None] = set()
        if saved:
            # One state of the adapter is one API checkpoint: every save of a hook holds it.
            self._latest = saved[-1]
            checkpoint_id = saved[-1]["checkpoint_id"]
            for path in self._written(before, after):
                orphans.add(self.api_checkpoints.get(path))
                self.api_checkpoints[path] = checkpoint_id
        # A file is gone when it is gone from disk: ModelCheckpoint does not list every
        # file it keeps (without a monitor, none but the newest).
        for path in [path for path in self.api_checkpoints if not _exists(path)]:
            orphans.add(self.api_checkpoints.pop(path))
        for orphan in orphans - set(self.api_checkpoints.values()) - {None}:
            self._delete_remote(trainer, str(orphan))

    def _written(self, before: dict[str, Any], after: dict[str, Any]) -> list[str]:
        """The kept files a hook that saved wrote: new ones, ``last``, and rewritten top-k."""
        written = [path for path in after if path not in before]
        if self.last_model_path:
            written.append(self.last_model_path)
        if self.monitor is None and self.best_model_path and self.save_top_k:
            written.append(self.best_model_path)
        written += [path for path in after if path in before and after[path] is not before[path]]
        return list(dict.fromkeys(written))

    def _delete_remote(self, trainer: pl.Trainer, checkpoint_id: str) -> None:
        module = trainer.lightning_module
        if (
            self.keep_remote
            or not trainer.is_global_zero
            or not isinstance(module, MoondreamRLModule)
        ):
            return
        latest = self._latest or {}
        if latest.get("dialect") == "finetunes" and latest.get("checkpoint_id") == checkpoint_id:
            rank_zero_info(
                f"API checkpoint {checkpoint_id} is kept although no file holds it: it is the "
                "finetune's latest, without which the finetune cannot be trained further"
            )
            return
        try:
            module.delete_api_checkpoint(checkpoint_id)
        except NotFoundError:
            rank_zero_warn(f"API checkpoint {checkpoint_id} was already gone")
        except TuningAPIError as exc:
            # Cleanup is not worth a run: the checkpoint stays, and the run goes on.
            rank_zero_warn(f"could not delete API checkpoint {checkpoint_id}: {exc}")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a resume, read which API checkpoint each kept file holds from the file."""
        super().on_fit_start(trainer, pl_module)
        if self.api_checkpoints:
            self.api_checkpoints = {
                path: checkpoint_id
                for path in self._kept()
                if (checkpoint_id := _api_checkpoint_of(path)) is not None
            }

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Say which API checkpoint each kept file holds, and how to run it."""
        super().on_fit_end(trainer, pl_module)
        if not self.api_checkpoints:
            return
        lines = ["Kept checkpoints (file -> API checkpoint -> inference model):"]
        for filepath, ref in sorted(self.api_checkpoints.items()):
            model = inference_model_id(ref) or "from_checkpoint=" + ref
            lines.append(f"  {filepath} -> {ref} -> {model}")
        rank_zero_info("\n".join(lines))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "api_checkpoints": dict(self.api_checkpoints)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.api_checkpoints = dict(state_dict.get("api_checkpoints", {}))


def _exists(path: str) -> bool:
    return bool(get_filesystem(path).exists(path))


def _api_checkpoint_of(path: str) -> str | None:
    """The API checkpoint a checkpoint file holds, or ``None`` if the file is gone."""
    if not _exists(path):
        return None
    with get_filesystem(path).open(path, "rb") as file:
        state = torch.load(file, map_location="cpu", weights_only=False).get(CHECKPOINT_KEY)
    return (state or {}).get("checkpoint_id")
