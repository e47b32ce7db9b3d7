"""``evaluate`` and ``test`` against the local service say that they score its stand-in model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from support import serving

from lightning_moondream.cli import MoondreamCLI, main
from lightning_moondream.server import close_app, create_app

SYNTHETIC = "{source: synthetic, num_images: 1, skills: [detect]}"
STAND_IN = "an offline stand-in for Moondream Cloud: it trains and scores its own small model, not Moondream."


pytestmark = pytest.mark.usefixtures("command_line")


@pytest.fixture(autouse=True)
def empty_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run in an empty folder, where no local service keeps data."""
    monkeypatch.chdir(tmp_path)


def evaluate(arguments: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--data", SYNTHETIC, "--model", "base", "--no-progress", *arguments])
    assert exit_info.value.code == 0


def test_evaluate_on_the_local_service_says_so_first_and_above_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate(["--out", "out"])
    note = "Scored by the local tuning service (data in moondream-local-service), " + STAND_IN
    assert capsys.readouterr().out.splitlines()[0] == note
    assert (tmp_path / "out" / "results.md").read_text().startswith(f"{note}\n\n| dataset |")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["note"] == note


def test_evaluate_on_a_remote_service_has_no_such_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MOONDREAM_API_KEY", "remote-key")
    app = create_app(api_keys=["remote-key"], data_dir=tmp_path / "served")
    try:
        with serving(app) as url:
            evaluate(["--out", "out", "--base-url", url])
    finally:
        close_app(app)
    assert capsys.readouterr().out.startswith("| dataset |")
    assert (tmp_path / "out" / "results.md").read_text().startswith("| dataset |")
    assert "note" not in json.loads((tmp_path / "out" / "results.json").read_text())


def test_fit_and_test_each_say_what_the_local_service_scores(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    data = [
        f"--data.train={SYNTHETIC}",
        f"--data.val={SYNTHETIC}",
        f"--data.test={SYNTHETIC}",
        "--data.num_workers=0",
        "--model.num_rollouts=2",
        "--trainer.max_steps=1",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
    ]
    cli = MoondreamCLI(["fit", *data])
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    announcements = [
        record.getMessage() for record in caplog.records if STAND_IN in record.getMessage()
    ]
    data_dir = tmp_path / "moondream-local-service"
    assert (
        announcements
        == [
            "No MOONDREAM_API_KEY and no base_url: using the local tuning service, in this process "
            f"(data in {data_dir}), {STAND_IN}"
        ]
        * 2
    )
