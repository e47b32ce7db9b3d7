"""A key's rate shared by the two processes of a DDP run (``tests/scripts/ddp_fit.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_ddp_module import ddp_run


def test_two_processes_each_take_half_of_the_keys_rate_and_apply_every_step(
    tmp_path: Path,
) -> None:
    ranks = ddp_run(tmp_path, "--max-steps", "3", "--requests-per-second", "10")
    for rank in ranks.values():
        assert rank["rate"] == pytest.approx(10 / 2)
        assert (rank["global_step"], rank["train_steps"], rank["skipped_steps"]) == (3, 3, 0)
        # Logged the same on every rank: the key's rate, every process's share summed.
        assert rank["metrics"]["train/admitted_rps"] == pytest.approx(10.0)
        assert rank["metrics"]["train/rate_limited"] == 0
    # Usage adds up over the processes: their admitted rates are the key's.
    assert ranks[0]["usage"]["admitted_rate"] == pytest.approx(10.0)
