"""A training process killed with SIGKILL resumes from ``last.ckpt`` without a step twice.

The run is a real ``Trainer`` in a subprocess, training against the local service in
that process, its data in a folder the resumed process shares, in each wire dialect.
The first process is killed once it has done a step past its last checkpoint (it waits
there, so where the kill lands does not depend on timing); the second resumes from
``last.ckpt``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_moondream.api import TuningClient
from lightning_moondream.module import CHECKPOINT_KEY

SCRIPT = Path(__file__).parent / "scripts" / "train_run.py"


def run_script(*args: str, **popen: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MOONDREAM_API_KEY", None)
    env.pop("MOONDREAM_TUNING_URL", None)
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **popen,  # type: ignore[call-overload]
    )


@pytest.mark.slow
@pytest.mark.parametrize("dialect", ["adapters", "finetunes"])
def test_a_run_killed_mid_training_resumes_from_last_ckpt_without_counting_a_step_twice(
    tmp_path: Path, dialect: str
) -> None:
    """On ``/adapters`` the resumed run goes on from the checkpoint on a new adapter.

    ``/finetunes`` cannot make a finetune from a checkpoint: the resumed run reattaches
    the killed run's finetune, which took a step after ``last.ckpt``, so it is refused,
    naming both steps, instead of counting that step twice.
    """
    service = tmp_path / "service"
    dialect_option = ("--dialect", dialect)
    first = run_script(
        str(tmp_path),
        "--service-dir",
        str(service),
        *dialect_option,
        "--max-steps",
        "50",
        "--pause-at",
        "5",
    )
    marker = tmp_path / "paused"
    deadline = time.monotonic() + 240
    while not marker.exists():
        if first.poll() is not None:
            raise AssertionError(
                f"the run ended before the kill:\n{first.stderr.read() if first.stderr else ''}"
            )
        assert time.monotonic() < deadline, "the run never reached step 5"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL

    # Killed after step 5; the last checkpoint is that of step 4.
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 4
    state = saved[CHECKPOINT_KEY]
    assert state["train_steps"] == 4
    with TuningClient.local(data_dir=service) as client:
        # The killed run's adapter got step 5 too; the resumed run must not inherit it.
        assert client.adapters.get(state["adapter_id"]).train_steps == 5

    second = run_script(
        str(tmp_path),
        "--service-dir",
        str(service),
        *dialect_option,
        "--max-steps",
        "9",
        "--resume",
        str(last),
    )
    out, err = second.communicate(timeout=240)
    if dialect == "finetunes":
        assert second.returncode != 0
        assert "ResumeMismatchError" in err
        assert "taken at train step 4 but the finetune reports 5" in err
        with TuningClient.local(data_dir=service) as client:
            assert client.adapters.get(state["adapter_id"]).train_steps == 5
        return
    assert second.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["global_step"] == 9
    assert result["resumed_from"] == state["checkpoint_id"]
    assert result["adapter_id"] != state["adapter_id"]
    with TuningClient.local(data_dir=service) as client:
        resumed = client.adapters.get(result["adapter_id"])
        # Steps 5 to 9, each once, on an adapter made from the step-4 API checkpoint.
        assert resumed.train_steps == 5
    final = torch.load(last, weights_only=False)
    assert final["global_step"] in (8, 9)
    assert final[CHECKPOINT_KEY]["adapter_id"] == result["adapter_id"]
