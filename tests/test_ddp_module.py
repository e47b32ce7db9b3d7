"""``MoondreamRLModule`` under Lightning DDP: two real processes joined by gloo on the CPU.

Each run is ``tests/scripts/ddp_fit.py`` in a child process; Lightning starts the second
rank by running it again. The service is the module's own (rank 0 serves it to rank 1)
or ``serve`` in a process of its own, over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import free_port, serve_command, wait_for_serve

from lightning_moondream.api import TuningClient

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"
KEY = "ddp-test-key"


def ddp_run(root: Path, *args: str, expect_failure: bool = False) -> dict[int, dict[str, Any]]:
    """Run the script; each rank's report (``{}`` for a failed run, with its output)."""
    # The package of this checkout, whichever one the environment installed.
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(root), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if expect_failure:
        assert done.returncode != 0
        return {-1: {"output": done.stdout + done.stderr}}
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return {
        int(path.stem.split("-")[1]): json.loads(path.read_text())
        for path in root.glob("rank-*.json")
    }


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[str]:
    """``serve`` in a process of its own on 127.0.0.1; yields its base URL."""
    port = free_port()
    process = subprocess.Popen(
        serve_command(port, tmp_path / "served", "--api-key", KEY),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1/tuning"
    try:
        wait_for_serve(process, url + "/adapters", KEY)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def served_steps(url: str) -> dict[str, int | None]:
    with TuningClient(api_key=KEY, base_url=url, dialect="adapters") as client:
        return {adapter.adapter_id: adapter.train_steps for adapter in client.adapters.iter()}


def validated_alike(root: Path, *args: str) -> dict[str, dict[str, Any]]:
    """Validate in one process and in two; assert every rank logs the same metrics.

    Five images: the processes get uneven shares, and none is counted twice.

    Returns:
        Rank 0's usage, by the number of processes.
    """
    metrics, usage = {}, {}
    for devices in ("1", "2"):
        ranks = ddp_run(root / devices, *args, "--devices", devices, "--val-images", "5")
        metrics[devices], usage[devices] = ranks[0]["metrics"], ranks[0]["usage"]
        assert all(rank["metrics"] == metrics[devices] for rank in ranks.values())
    assert metrics["2"] == pytest.approx(metrics["1"])
    assert {"val/map", "val/reward"} <= set(metrics["1"])
    return usage


def test_two_processes_train_one_adapter_on_the_modules_own_service(tmp_path: Path) -> None:
    ranks = ddp_run(tmp_path, "--max-steps", "4")
    zero, one = ranks[0], ranks[1]
    # Every rank agrees with the service: one adapter, one train step per global step.
    service = tmp_path / "service"
    with TuningClient.local(data_dir=service, dialect="adapters") as client:
        adapters = {adapter.adapter_id: adapter.train_steps for adapter in client.adapters.iter()}
    with TuningClient.local(data_dir=service, dialect="finetunes") as client:
        saved = {checkpoint.ref for checkpoint in client.checkpoints.iter(zero["adapter_id"])}
    assert adapters == {zero["adapter_id"]: 4}
    for rank in (zero, one):
        assert (rank["global_step"], rank["train_steps"], rank["skipped_steps"]) == (4, 4, 0)
    # The groups of both ranks (2 samples each) went into each step; logged alike.
    assert zero["metrics"] == one["metrics"]
    assert zero["metrics"]["train/groups"] == 4
    # One API checkpoint per Lightning checkpoint (last.ckpt is the step-4 one).
    assert sorted(set(zero["api_checkpoints"])) == sorted(saved)
    assert saved == {f"{zero['adapter_id']}@2", f"{zero['adapter_id']}@4"}
    # The usage covers both processes: 4 steps x 2 ranks x 2 samples x 2 rollouts.
    assert zero["usage"]["rollouts"] == one["usage"]["rollouts"] == 32
    assert zero["usage"]["train_steps"] == 4


def test_a_reward_failing_on_rank_1_fails_both_ranks_with_its_error(tmp_path: Path) -> None:
    output = ddp_run(tmp_path, "--fail-on-rank", "1", expect_failure=True)[-1]["output"]
    assert "[rank1]: ZeroDivisionError: reward broken for sample" in output
    assert "[rank0]: ZeroDivisionError: reward broken for sample" in output
    assert "raised on rank 1; every rank of the run stops with it" in output


@pytest.mark.slow
def test_a_checkpoint_validated_under_ddp_answers_through_rank_0s_inference_api(
    tmp_path: Path,
) -> None:
    trained = ddp_run(tmp_path / "fit", "--max-steps", "4")
    finetune = trained[0]["adapter_id"]
    service = tmp_path / "fit" / "service"
    checkpoint = next((tmp_path / "fit" / "ckpt").glob("*step=2.ckpt"))
    usage = validated_alike(
        tmp_path, "--validate-checkpoint", str(checkpoint), "--service", str(service)
    )
    # Answered by moondream3-preview/FT@2 (no rollouts), every rank through rank 0's
    # service, with nothing trained, attached or created.
    for devices in ("1", "2"):
        assert usage[devices]["rollouts"] == 0 and usage[devices]["requests"] >= 5
    with TuningClient.local(data_dir=service, dialect="adapters") as client:
        adapters = {adapter.adapter_id: adapter.train_steps for adapter in client.adapters.iter()}
    assert adapters == {finetune: 4}


@pytest.mark.slow
def test_resume_under_ddp_continues_the_step_count(tmp_path: Path, serve: str) -> None:
    first = ddp_run(tmp_path / "a", "--base-url", serve, "--api-key", KEY, "--max-steps", "4")
    finetune = first[0]["adapter_id"]
    resumed = ddp_run(
        tmp_path / "b",
        "--base-url",
        serve,
        "--api-key",
        KEY,
        "--max-steps",
        "6",
        "--resume",
        str(tmp_path / "a" / "ckpt" / "last.ckpt"),
    )
    for rank in resumed.values():
        assert (rank["adapter_id"], rank["global_step"], rank["train_steps"]) == (finetune, 6, 6)
    assert served_steps(serve) == {finetune: 6}


@pytest.mark.slow
def test_validation_under_ddp_equals_one_process(tmp_path: Path, serve: str) -> None:
    trained = ddp_run(tmp_path / "fit", "--base-url", serve, "--api-key", KEY, "--max-steps", "2")
    adapter = trained[0]["adapter_id"]
    validated_alike(tmp_path, "--base-url", serve, "--api-key", KEY, "--validate", adapter)


@pytest.mark.slow
def test_accumulated_batches_of_both_ranks_make_one_train_step(tmp_path: Path, serve: str) -> None:
    ranks = ddp_run(
        tmp_path, "--base-url", serve, "--api-key", KEY, "--max-steps", "2", "--accumulate", "2"
    )
    # 2 batches x 2 ranks x 2 samples, every group with reward spread.
    assert ranks[0]["metrics"]["train/groups"] == 8
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 2
    assert served_steps(serve) == {ranks[0]["adapter_id"]: 2}


@pytest.mark.slow
def test_ddp_spawn_with_staleness_1_trains_one_adapter(tmp_path: Path, serve: str) -> None:
    ranks = ddp_run(
        tmp_path,
        *("--base-url", serve, "--api-key", KEY, "--max-steps", "4"),
        *("--strategy", "ddp_spawn", "--staleness", "1"),
    )
    zero, one = ranks[0], ranks[1]
    # Rollouts of each step overlapped the previous train step; the counts still agree.
    assert served_steps(serve) == {zero["adapter_id"]: 4}
    for rank in (zero, one):
        assert (rank["global_step"], rank["train_steps"], rank["skipped_steps"]) == (4, 4, 0)
    assert zero["metrics"] == one["metrics"]
