"""A new user's first commands: ``fit`` with no model named, ``adapters`` with no key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_moondream.api import TuningClient
from lightning_moondream.cli import MoondreamCLI, main
from lightning_moondream.module import MoondreamRLModule

pytestmark = pytest.mark.usefixtures("command_line")


@pytest.fixture(autouse=True)
def empty_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run in an empty folder, where no local service keeps data."""
    monkeypatch.chdir(tmp_path)


def run_adapters(arguments: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as exit_info:
        main(["adapters", *arguments])
    return exit_info.value.code


def make_store(folder: Path) -> str:
    """A local service's data folder holding one adapter; returns its id."""
    with TuningClient.local(data_dir=folder) as client:
        return client.adapters.create("kept", 16).adapter_id


def test_fit_without_a_model_trains_the_moondream_module(tmp_path: Path) -> None:
    cli = MoondreamCLI(
        [
            "fit",
            "--data.train={source: synthetic, num_images: 2, skills: [detect]}",
            "--data.val={source: synthetic, num_images: 1, skills: [detect]}",
            "--data.num_workers=0",
            "--trainer.fast_dev_run=1",
        ]
    )
    assert type(cli.model) is MoondreamRLModule
    assert cli.trainer.global_step == 1
    with TuningClient.local(data_dir=tmp_path / "moondream-local-service") as client:
        assert [adapter.adapter_id for adapter in client.adapters.iter()] == [
            cli.model.adapter.adapter_id
        ]


@pytest.mark.parametrize(
    "command", [["list"], ["checkpoints", "0123456789abcdef"], ["metrics", "x"]]
)
def test_a_run_folder_as_local_dir_is_refused_naming_where_the_data_is(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "runs" / "quickstart"
    make_store(run / "moondream-local-service")
    assert run_adapters(["--local-dir", str(run), *command]) == 1
    error = capsys.readouterr().err
    assert error == (
        f"error: {run} (--local-dir) holds no local tuning service data (no tuning.sqlite3); "
        f"it is in {run / 'moondream-local-service'}: pass that as --local-dir\n"
    )
    assert sorted(path.name for path in run.iterdir()) == ["moondream-local-service"]


def test_a_folder_without_data_is_refused_and_left_uncreated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "elsewhere"
    assert run_adapters(["--local-dir", str(missing), "list"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: {missing} (--local-dir) holds no local tuning service data")
    assert "<default_root_dir>/moondream-local-service" in error and "MOONDREAM_API_KEY" in error
    assert not missing.exists()


def test_no_key_and_no_folder_points_at_the_runs_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_store(tmp_path / "runs" / "quickstart" / "moondream-local-service")
    assert run_adapters(["list"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(
        "error: moondream-local-service (no key, no base URL: the default folder)"
    )
    assert "it is in runs/quickstart/moondream-local-service: pass that as --local-dir" in error
    assert not (tmp_path / "moondream-local-service").exists()


def test_the_default_folder_is_listed_when_it_holds_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter_id = make_store(tmp_path / "moondream-local-service")
    main(["adapters", "list"])
    assert adapter_id in capsys.readouterr().out


def test_a_base_url_without_a_key_names_the_variable_and_local_dir(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_adapters(["--base-url", "http://127.0.0.1:9", "list"]) == 1
    error = capsys.readouterr().err
    assert error == (
        "error: no API key: set the MOONDREAM_API_KEY environment variable, or inspect a local "
        "tuning service's data with --local-dir FOLDER (a run keeps it in "
        "<default_root_dir>/moondream-local-service)\n"
    )
    assert "api_key=" not in error
