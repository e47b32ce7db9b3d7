"""``RemoteCheckpoint``: a ``ModelCheckpoint`` that keeps API checkpoints in step with files."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_moondream.api import NotFoundError, TuningAPIError, inference_model_id
from lightning_moondream.module import MoondreamRLModule


class RemoteCheckpoint(ModelCheckpoint):
    """Save checkpoints the Lightning way, each paired with an API checkpoint.

    Every file it writes holds the id of the API checkpoint saved with it (the
    ``MoondreamRLModule`` saves one per Lightning checkpoint). When this callback deletes a
    file (top-k, or an overwritten ``last.ckpt``), it deletes that API checkpoint too,
    unless ``keep_remote=True``.

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

    @property
    def best_api_checkpoint_id(self) -> str | None:
        """The API checkpoint of the best model so far, ready for ``from_checkpoint``."""
        return self.api_checkpoints.get(self.best_model_path)

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        replaced = self.api_checkpoints.get(filepath)
        super()._save_checkpoint(trainer, filepath)
        module = trainer.lightning_module
        saved = module.last_saved_checkpoint_id if isinstance(module, MoondreamRLModule) else None
        if saved is None:
            return
        self.api_checkpoints[filepath] = saved
        # Overwriting a file (last.ckpt) orphans the API checkpoint it pointed to, unless
        # another kept file holds it too (on /finetunes, saves at one step are one).
        if replaced is not None and replaced not in self.api_checkpoints.values():
            self._delete_remote(trainer, replaced)

    @override
    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        checkpoint_id = self.api_checkpoints.pop(filepath, None)
        if checkpoint_id is not None and checkpoint_id not in self.api_checkpoints.values():
            self._delete_remote(trainer, checkpoint_id)

    def _delete_remote(self, trainer: pl.Trainer, checkpoint_id: str) -> None:
        module = trainer.lightning_module
        if (
            self.keep_remote
            or not trainer.is_global_zero
            or not isinstance(module, MoondreamRLModule)
        ):
            return
        try:
            module.delete_api_checkpoint(checkpoint_id)
        except NotFoundError:
            rank_zero_warn(f"API checkpoint {checkpoint_id} was already gone")
        except TuningAPIError as exc:
            # Cleanup is not worth a run: the checkpoint stays, and the run goes on.
            rank_zero_warn(f"could not delete API checkpoint {checkpoint_id}: {exc}")

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
