"""``lightning-moondream adapters`` with a chosen wire dialect, on the local service."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_moondream.api import TuningClient
from lightning_moondream.cli import main


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
