"""The command's own help and its error for an unknown subcommand list every subcommand."""

from __future__ import annotations

import re

import pytest

from lightning_moondream.cli import main


@pytest.mark.parametrize(
    ("arguments", "status", "stream"),
    [(["--help"], 0, "out"), ([], 2, "out"), (["frobnicate"], 2, "err")],
)
def test_top_level_help_lists_every_subcommand(
    arguments: list[str], status: int, stream: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == status
    text = getattr(capsys.readouterr(), stream)
    for name in ("fit", "validate", "test", "predict", "evaluate", "serve", "adapters"):
        assert re.search(rf"^  {name} +\S", text, re.MULTILINE), name
    if arguments == ["frobnicate"]:
        assert "unknown subcommand 'frobnicate'" in text
