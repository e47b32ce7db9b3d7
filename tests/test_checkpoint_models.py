"""A saved checkpoint is a model: validate, test and predict answer through its inference model.

On ``/finetunes`` a run's best checkpoint is usually behind the finetune: evaluating it
must not reattach to the finetune, and must give the metrics ``evaluate`` gives for the
same model. ``RemoteCheckpoint`` keeps ``last.ckpt`` at the latest step, one API
checkpoint per step, and a summary that is right after a resume.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from collections.abc import Sized
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import lightning as L
import moondream  # a missing SDK must fail this test, not skip it
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from moondream.types import Base64EncodedImage
from pydantic import SecretStr
from support import (
    HideTrainSteps,
    alternating_reward,
    detect_samples,
    free_port,
    loader,
    quiet_trainer,
    serve_command,
    serving,
    wait_for_serve,
)

from lightning_moondream.api import AsyncTuningClient, TuningClient
from lightning_moondream.api.inprocess import InProcessTransport
from lightning_moondream.callbacks import RemoteCheckpoint
from lightning_moondream.cli import main
from lightning_moondream.evaluation import evaluate_async, load_data
from lightning_moondream.module import (
    CHECKPOINT_KEY,
    SAMPLE_ENCODING,
    AmbiguousTrainStepError,
    MoondreamRLModule,
    ResumeMismatchError,
)
from lightning_moondream.server import create_app

METRICS = ("map", "map_50", "det_f1", "det_miou", "reward")
KEY = "checkpoint-models-key"
TEST_DATA = "{source: synthetic, split: test, num_images: 2, skills: [detect]}"


def held_out_samples() -> list[Any]:
    """The test data, as ``evaluate --data TEST_DATA`` reads it."""
    _, dataset = load_data(TEST_DATA)
    return [dataset[index] for index in range(len(cast(Sized, dataset)))]


class BestAt(Callback):
    """Logs ``score``, highest at one global step, so the best checkpoint is a chosen one."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("score", float(trainer.global_step == self.step))


class Shapes(L.LightningDataModule):
    """Synthetic detect samples: 8 training batches, one validation and one test batch."""

    def train_dataloader(self) -> Any:
        return loader(detect_samples("train", 16), batch_size=2)

    def val_dataloader(self) -> Any:
        return loader(detect_samples("val", 4), batch_size=4)

    def test_dataloader(self) -> Any:
        return loader(held_out_samples(), batch_size=4)

    def predict_dataloader(self) -> Any:
        return self.test_dataloader()


def checkpoints(root: Path) -> RemoteCheckpoint:
    return RemoteCheckpoint(
        dirpath=root / "ckpt",
        filename="{step}",
        monitor="score",
        mode="max",
        save_top_k=1,
        save_last=True,
    )


def trainer(root: Path, callback: RemoteCheckpoint, max_steps: int, best: int = 2) -> L.Trainer:
    return quiet_trainer(
        root,
        max_steps=max_steps,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        enable_checkpointing=True,
        callbacks=[callback, BestAt(best)],
    )


def module(**options: Any) -> MoondreamRLModule:
    return MoondreamRLModule(num_rollouts=4, dialect="finetunes", **options)


def held(path: str | Path) -> dict[str, Any]:
    """The API state a Lightning checkpoint file holds."""
    return torch.load(path, weights_only=False)[CHECKPOINT_KEY]


def service_state(root: Path, finetune: str) -> tuple[int | None, list[str], int]:
    """The finetune's step, its kept checkpoints, and how many finetunes the service has."""
    service = root / "moondream-local-service"
    with TuningClient.local(data_dir=service, dialect="adapters") as client:
        count = len(list(client.adapters.iter(limit=100)))
    with TuningClient.local(data_dir=service, dialect="finetunes") as client:
        steps = client.adapters.get(finetune).train_steps
        refs = [checkpoint.ref for checkpoint in client.checkpoints.iter(finetune)]
    return steps, refs, count


def evaluated(root: Path, model: str) -> dict[str, Any]:
    """``evaluate``'s row and predictions for ``model`` on the test samples."""

    async def run() -> Any:
        client = AsyncTuningClient.local(data_dir=root / "moondream-local-service")
        try:
            return await evaluate_async(client, [load_data(TEST_DATA)], [model], progress=False)
        finally:
            await client.close()

    report = asyncio.run(run())
    [row] = report.rows
    return {"row": row, "outputs": [prediction.output for prediction in report.predictions]}


def test_a_finetune_checkpoint_behind_the_finetune_is_tested_read_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    callback = checkpoints(tmp_path)
    fit = trainer(tmp_path, callback, max_steps=4)
    model = module()
    fit.fit(model, Shapes())
    finetune = model.adapter.adapter_id

    # last.ckpt holds the latest step although the top-k file (step 2) was not replaced.
    best, last = callback.best_model_path, callback.last_model_path
    assert Path(best).name == "step=2.ckpt" and Path(last).name == "last.ckpt"
    assert held(best)["checkpoint_id"] == f"{finetune}@2"
    assert held(last)["checkpoint_id"] == f"{finetune}@4"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    # One API checkpoint per kept step; those no file holds are gone.
    assert callback.api_checkpoints == {best: f"{finetune}@2", last: f"{finetune}@4"}
    steps, refs, finetunes = service_state(tmp_path, finetune)
    assert (steps, refs) == (4, [f"{finetune}@2", f"{finetune}@4"])

    with caplog.at_level(logging.INFO):
        [tested] = fit.test(model, Shapes(), ckpt_path="best")
    assert f"as moondream3-preview/{finetune}@2 (read-only" in caplog.text
    expected = evaluated(tmp_path, f"{finetune}@2")
    assert expected["row"]["path"] == "inference"
    assert expected["row"]["model_id"] == f"moondream3-preview/{finetune}@2"
    assert {name: tested[f"test/{name}"] for name in METRICS} == pytest.approx(
        {name: expected["row"][name] for name in METRICS}
    )
    predicted = fit.predict(model, Shapes(), ckpt_path="best")
    assert [record["output"] for batch in predicted for record in batch] == expected["outputs"]
    # Read-only: the finetune stays at step 4, and no finetune was made for evaluating.
    assert service_state(tmp_path, finetune) == (steps, refs, finetunes)

    # Either path gives the same metrics: the step-4 checkpoint through inference, and
    # the finetune itself (at step 4) through greedy rollouts.
    [by_inference] = fit.validate(model, Shapes(), ckpt_path="last")
    attached = module(adapter_id=finetune)
    [by_rollouts] = quiet_trainer(tmp_path, limit_val_batches=1).validate(attached, Shapes())
    by_inference.pop("score")  # the fit trainer's own callback logs it
    assert by_inference == pytest.approx(by_rollouts)
    assert evaluated(tmp_path, finetune)["row"]["path"] == "rollouts"


def test_resume_summary_and_going_on_where_the_finetune_stands(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = checkpoints(tmp_path)
    model = module()
    trainer(tmp_path, first, max_steps=4).fit(model, Shapes())
    finetune = model.adapter.adapter_id
    best = first.best_model_path

    # Resumed from last.ckpt: the summary names what each kept file holds now.
    second = checkpoints(tmp_path)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, second, max_steps=6).fit(
            module(), Shapes(), ckpt_path=first.last_model_path
        )
    last = second.last_model_path
    assert second.api_checkpoints == {best: f"{finetune}@2", last: f"{finetune}@6"}
    summary = caplog.text[caplog.text.index("Kept checkpoints") :]
    assert f"{last} -> {finetune}@6 -> moondream3-preview/{finetune}@6" in summary
    assert f"{finetune}@4" not in summary and f"{finetune}@5" not in summary
    assert service_state(tmp_path, finetune)[:2] == (6, [f"{finetune}@2", f"{finetune}@6"])

    # The finetune is past the best checkpoint (step 2): fit resumes there only when asked.
    with pytest.raises(ResumeMismatchError, match="resume_at_finetune_step=True"):
        trainer(tmp_path, checkpoints(tmp_path), max_steps=4).fit(
            module(), Shapes(), ckpt_path=best
        )
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed = module(resume_at_finetune_step=True)
        run = trainer(tmp_path, checkpoints(tmp_path), max_steps=4)
        run.fit(resumed, Shapes(), ckpt_path=best)
    assert f"finetune {finetune} is at train step 6, 4 past the checkpoint's step 2" in caplog.text
    # Two more global steps, each sent once: steps 3 to 6 of the earlier runs are kept.
    assert run.global_step == 4
    assert resumed.train_steps == 8
    assert service_state(tmp_path, finetune)[0] == 8


def test_a_finetune_ahead_of_its_checkpoint_on_a_service_that_hides_its_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As on Moondream Cloud, whose finetunes do not report their step when read: the
    first train step's answer tells that the finetune went on past the checkpoint."""
    app = create_app(
        data_dir=tmp_path / "service", api_keys=[KEY], policy="constant", dialect="finetunes"
    )
    data = loader(detect_samples("train", 16), batch_size=2)

    def run(
        steps: int, *callbacks: Callback, **options: Any
    ) -> tuple[L.Trainer, MoondreamRLModule]:
        model = MoondreamRLModule(
            api_key=KEY,
            base_url=url,
            num_rollouts=2,
            dialect="finetunes",
            reward=alternating_reward(),
            **options,
        )
        fit = quiet_trainer(
            tmp_path, max_steps=steps, enable_checkpointing=bool(callbacks), callbacks=[*callbacks]
        )
        return fit, model

    with serving(HideTrainSteps(app)) as url:
        fit, model = run(
            4, RemoteCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
        )
        fit.fit(model, data)
        finetune = model.adapter.adapter_id
        step_2 = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
        assert held(step_2)["train_steps"] == 2

        fit, model = run(4)
        with pytest.raises(AmbiguousTrainStepError, match="reports step 5 after this run's train"):
            fit.fit(model, data, ckpt_path=step_2)

        caplog.clear()
        fit, model = run(4, resume_at_finetune_step=True)
        with caplog.at_level(logging.INFO):
            fit.fit(model, data, ckpt_path=step_2)
    # The run that stopped had its one step applied: steps 1 to 5 stay, each once.
    assert (
        f"finetune {finetune} answered this run's train step 3 at step 6: it had gone on past "
        "the checkpoint" in caplog.text
    )
    assert fit.global_step == 4 and model.train_steps == 7
    # Read from the app itself, which reports the step.
    http = httpx.Client(transport=InProcessTransport(app))
    with TuningClient(api_key=KEY, base_url=url, http_client=http, dialect="finetunes") as client:
        assert client.adapters.get(finetune).train_steps == 7


def test_the_best_checkpoint_of_a_served_finetune_is_one_model_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a ``/finetunes``-only ``serve``: test("best"), ``evaluate`` and ``md.vl`` agree."""
    port = free_port()
    process = subprocess.Popen(
        serve_command(port, tmp_path / "served", "--api-key", KEY, "--dialect", "finetunes"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1/tuning"
    try:
        wait_for_serve(process, url + "/finetunes", KEY)
        run = trainer(tmp_path, checkpoints(tmp_path), max_steps=4)
        model = MoondreamRLModule(num_rollouts=4, base_url=url, api_key=SecretStr(KEY))
        run.fit(model, Shapes())
        finetune = model.adapter.adapter_id
        assert model.client.dialect == "finetunes"
        [tested] = run.test(model, Shapes(), ckpt_path="best")
        [predicted, *_] = run.predict(model, Shapes(), ckpt_path="best")

        monkeypatch.setenv("MOONDREAM_API_KEY", KEY)
        evaluate = ["evaluate", "--model", f"{finetune}@2", "--base-url", url]
        evaluate += ["--data", TEST_DATA, "--out", str(tmp_path / "eval"), "--no-progress"]
        with pytest.raises(SystemExit) as exit_info:
            main(evaluate)
        assert exit_info.value.code == 0

        sample = held_out_samples()[0].encoded(SAMPLE_ENCODING)
        vl = moondream.vl(
            endpoint=url.removesuffix("/tuning"),
            api_key=KEY,
            model=f"moondream3-preview/{finetune}@2",
        )
        image = Base64EncodedImage(image_url=sample.image)
        answered = vl.detect(image, sample.object, settings={"temperature": 0.0})
    finally:
        process.terminate()
        process.wait(timeout=30)
    [row] = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert (row["path"], row["model_id"]) == ("inference", f"moondream3-preview/{finetune}@2")
    assert {name: tested[f"test/{name}"] for name in METRICS} == pytest.approx(
        {name: row[name] for name in METRICS}
    )
    assert answered["objects"] == predicted[0]["output"]["boxes"]


def test_the_finetunes_latest_api_checkpoint_outlives_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files gone from disk take their API checkpoints, except the finetune's latest."""
    deleted: list[str] = []
    model = module()
    monkeypatch.setattr(model, "delete_api_checkpoint", deleted.append)
    trainer = cast(L.Trainer, SimpleNamespace(is_global_zero=True, lightning_module=model))
    callback = checkpoints(tmp_path)
    callback.api_checkpoints = {
        str(tmp_path / "ckpt" / "step=2.ckpt"): "ft@2",
        str(tmp_path / "ckpt" / "last.ckpt"): "ft@3",
    }
    for saved in ("ft@2", "ft@3"):
        callback.on_save_checkpoint(
            trainer, model, {CHECKPOINT_KEY: {"dialect": "finetunes", "checkpoint_id": saved}}
        )
    callback._follow(trainer, {})
    assert deleted == ["ft@2"]
    assert callback.api_checkpoints == {}
