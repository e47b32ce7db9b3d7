"""Fixtures shared by the tests of the ``lightning-moondream`` command."""

from __future__ import annotations

import pytest


@pytest.fixture
def command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as the installed command would: no key, no base URL, no pytest arguments."""
    monkeypatch.setattr("sys.argv", ["lightning-moondream"])
    monkeypatch.delenv("MOONDREAM_API_KEY", raising=False)
    monkeypatch.delenv("MOONDREAM_TUNING_URL", raising=False)
