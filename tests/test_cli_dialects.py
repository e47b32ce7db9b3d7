"""The command line with either wire dialect: ``adapters`` commands, and the quickstart
against a service that speaks only ``/finetunes``."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import serving

from lightning_moondream.api import TuningClient
from lightning_moondream.cli import MoondreamCLI, main
from lightning_moondream.server import create_app

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_adapters_command_speaks_the_chosen_dialect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = tmp_path / "service"
    with TuningClient.local(data_dir=local, dialect="adapters") as client:
        adapter = client.adapters.create("kept", 16)
        checkpoint = client.checkpoints.save(adapter.adapter_id)
    command = ["adapters", "--local-dir", str(local), "--dialect", "adapters"]
    main([*command, "checkpoints", adapter.adapter_id])
    listing = capsys.readouterr().out
    assert listing.splitlines()[0].split() == ["ref", "step", "created_at", "model_id"]
    assert checkpoint.ref in listing
    # Metrics travel only on /finetunes: the command says so and fails.
    with pytest.raises(SystemExit) as failed:
        main([*command, "metrics", adapter.adapter_id])
    assert failed.value.code == 1
    assert "reading metrics is not supported by the /adapters dialect" in capsys.readouterr().err


def test_an_unknown_dialect_is_refused_by_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as failed:
        main(["adapters", "--dialect", "cloud", "list"])
    assert failed.value.code == 2
    assert "invalid choice: 'cloud'" in capsys.readouterr().err


def test_the_quickstart_trains_resumes_and_evaluates_on_a_finetunes_only_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(data_dir=tmp_path / "service", api_keys=["ft-key"], dialect="finetunes")
    with serving(app) as url:
        monkeypatch.setenv("MOONDREAM_API_KEY", "ft-key")
        monkeypatch.setenv("MOONDREAM_TUNING_URL", url)
        options = [
            f"--config={CONFIGS / 'quickstart.yaml'}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            "--data.train={source: synthetic, num_images: 8, skills: [detect]}",
            "--data.val={source: synthetic, num_images: 2, skills: [detect]}",
            "--data.test={source: synthetic, num_images: 2, skills: [detect]}",
            "--data.num_workers=0",
            "--data.batch_size=2",
            "--model.num_rollouts=4",
        ]
        first = MoondreamCLI(["fit", *options, "--trainer.max_steps=2"])
        last = first.trainer.checkpoint_callback.last_model_path  # type: ignore[union-attr]
        resumed = MoondreamCLI(["fit", *options, "--trainer.max_steps=4", f"--ckpt_path={last}"])
        last = resumed.trainer.checkpoint_callback.last_model_path  # type: ignore[union-attr]
        tested = MoondreamCLI(["test", *options, f"--ckpt_path={last}"])

    finetune = first.model.adapter.adapter_id
    assert resumed.model.adapter.adapter_id == tested.model.adapter.adapter_id == finetune
    assert resumed.model.client.dialect == "finetunes"
    assert resumed.trainer.global_step == 4
    assert resumed.model.train_steps == 4 - resumed.model.skipped_steps
    assert "test/map" in tested.trainer.callback_metrics
