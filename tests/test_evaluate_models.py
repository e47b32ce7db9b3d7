"""``evaluate`` takes every form a model has: base, finetune checkpoints, adapters, ``.ckpt`` files.

The base model and ``/finetunes`` checkpoints answer through the inference API (no
finetune is made for them); adapters and ``/adapters`` checkpoints through rollouts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from support import detect_samples

from lightning_moondream.api import AsyncTuningClient, Settings, TuningClient
from lightning_moondream.api.client import DialectChoice
from lightning_moondream.evaluation import EvaluationError, ModelSpec, evaluate_async
from lightning_moondream.session import CHECKPOINT_KEY

METRICS = ("map", "map_50", "det_f1", "det_miou", "reward")


def train_and_save(client: TuningClient, adapter_id: str, steps: int) -> list[Any]:
    """Train ``steps`` steps on synthetic detect samples, saving a checkpoint after each."""
    saved = []
    for step in range(steps):
        groups = []
        for sample in detect_samples("train", 2, offset=2 * step):
            response = client.rollouts(
                adapter_id, sample.to_request(Settings(temperature=1.0)), 4, sample.ground_truth()
            )
            groups.append(response.to_group(response.rewards))
        client.train_step(adapter_id, groups)
        saved.append(client.checkpoints.save(adapter_id))
    return saved


def lightning_checkpoint(path: Path, client: TuningClient, checkpoint: Any) -> Path:
    """A Lightning checkpoint file holding ``checkpoint``'s API state, as the module writes it."""
    state = {
        "adapter_id": checkpoint.finetune_id or checkpoint.checkpoint_id.split("/")[0],
        "checkpoint_id": checkpoint.ref,
        "model_id": checkpoint.model_id,
        "dialect": client.dialect,
        "train_steps": checkpoint.step,
        "skipped_steps": 0,
    }
    torch.save({"global_step": checkpoint.step, CHECKPOINT_KEY: state}, path)
    return path


def service(root: Path, dialect: DialectChoice) -> tuple[str, list[Any], Path]:
    """A local service with an adapter trained two steps, a checkpoint after each."""
    with TuningClient.local(data_dir=root / "service", dialect=dialect) as client:
        adapter_id = client.adapters.create("evaluated", rank=16).adapter_id
        saved = train_and_save(client, adapter_id, 2)
        ckpt = lightning_checkpoint(root / "first.ckpt", client, saved[0])
    return adapter_id, saved, ckpt


def evaluate(root: Path, dialect: DialectChoice, models: list[str]) -> dict[str, dict[str, Any]]:
    async def run() -> Any:
        client = AsyncTuningClient.local(data_dir=root / "service", dialect=dialect)
        try:
            return await evaluate_async(
                client, [("shapes", detect_samples("val", 4))], models, progress=False
            )
        finally:
            await client.close()

    return {row["model"]: row for row in asyncio.run(run()).rows}


def adapter_count(root: Path, dialect: DialectChoice) -> int:
    with TuningClient.local(data_dir=root / "service", dialect=dialect) as client:
        return len(list(client.adapters.iter(limit=100)))


def metrics(row: dict[str, Any]) -> dict[str, float]:
    return {name: row[name] for name in METRICS}


def test_finetune_checkpoints_and_files_are_evaluated_through_inference(tmp_path: Path) -> None:
    finetune, _, ckpt = service(tmp_path, "finetunes")
    before = adapter_count(tmp_path, "finetunes")
    models = ["base", f"{finetune}@1", f"moondream3-preview/{finetune}@2", finetune, str(ckpt)]
    rows = evaluate(tmp_path, "finetunes", models)
    assert {name: (row["path"], row["model_id"]) for name, row in rows.items()} == {
        "base": ("inference", "moondream3-preview"),
        f"{finetune}@1": ("inference", f"moondream3-preview/{finetune}@1"),
        f"moondream3-preview/{finetune}@2": ("inference", f"moondream3-preview/{finetune}@2"),
        finetune: ("rollouts", finetune),
        str(ckpt): ("inference", f"moondream3-preview/{finetune}@1"),
    }
    # The step-2 checkpoint holds the finetune's current weights: both paths agree.
    assert metrics(rows[f"moondream3-preview/{finetune}@2"]) == pytest.approx(
        metrics(rows[finetune])
    )
    assert metrics(rows[str(ckpt)]) == metrics(rows[f"{finetune}@1"])
    assert adapter_count(tmp_path, "finetunes") == before


def test_adapters_checkpoints_and_files_are_evaluated_through_rollouts(tmp_path: Path) -> None:
    adapter_id, saved, ckpt = service(tmp_path, "adapters")
    before = adapter_count(tmp_path, "adapters")
    latest = saved[-1].checkpoint_id
    rows = evaluate(tmp_path, "adapters", [adapter_id, latest, str(ckpt)])
    assert {name: (row["path"], row["model_id"]) for name, row in rows.items()} == {
        adapter_id: ("rollouts", adapter_id),
        latest: ("rollouts", latest),
        str(ckpt): ("rollouts", saved[0].checkpoint_id),
    }
    assert metrics(rows[latest]) == pytest.approx(metrics(rows[adapter_id]))
    # The adapters made from checkpoints are gone.
    assert adapter_count(tmp_path, "adapters") == before


def test_a_missing_checkpoint_is_refused_naming_those_that_exist(tmp_path: Path) -> None:
    finetune, _, _ = service(tmp_path, "finetunes")
    with pytest.raises(EvaluationError) as refused:
        evaluate(tmp_path, "finetunes", [f"{finetune}@7"])
    message = str(refused.value)
    assert f"'{finetune}@7'" in message and "no checkpoint at step 7" in message
    assert f"{finetune}@1 (step 1), {finetune}@2 (step 2)" in message
    with pytest.raises(EvaluationError, match="no adapter or finetune 'nope'"):
        evaluate(tmp_path, "finetunes", ["nope@3"])


def test_model_forms_are_parsed(tmp_path: Path) -> None:
    assert ModelSpec.parse("ft1@3") == ModelSpec(
        "ft1@3", adapter_id="ft1", inference_model="moondream3-preview/ft1@3", step=3
    )
    assert ModelSpec.parse("moondream3-preview/ft1@3").inference_model == "moondream3-preview/ft1@3"
    assert ModelSpec.parse("ad1@chk_002").checkpoint_id == "ad1/chk_002"
    with pytest.raises(EvaluationError, match="no such Lightning checkpoint file"):
        ModelSpec.parse(str(tmp_path / "missing.ckpt"))
    empty = tmp_path / "empty.ckpt"
    torch.save({"global_step": 3}, empty)
    with pytest.raises(EvaluationError, match="holds no Moondream API checkpoint"):
        ModelSpec.parse(str(empty))
