"""The acceptance test of the reference policy: GRPO through the HTTP API improves it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning_run.py"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_detect_reward_rises_after_40_train_steps(seed: int) -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--seed", str(seed), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["after"] - result["before"] >= 0.1, result
