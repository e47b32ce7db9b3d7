"""``Collective`` in two real processes joined by a gloo process group on 127.0.0.1."""

from __future__ import annotations

import multiprocessing
import queue
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as dist
from support import free_port

from lightning_moondream.distributed import Collective, RankFailedError

WORLD = 2


def _child(
    rank: int, port: int, scenario: Callable[[Collective], Any], results: Any, timeout: float
) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        collective = Collective.create(timeout=timeout)
        try:
            results.put((rank, "ok", scenario(collective)))
        except BaseException as exc:
            notes = getattr(exc, "__notes__", [])
            results.put((rank, "error", (type(exc).__name__, str(exc), notes)))
    finally:
        dist.destroy_process_group()


def run_two(scenario: Callable[[Collective], Any], timeout: float = 60.0) -> dict[int, Any]:
    """Run ``scenario(collective)`` on two ranks; each rank's ``(status, value)``."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_child, args=(rank, port, scenario, results, timeout))
        for rank in range(WORLD)
    ]
    for process in processes:
        process.start()
    outcome: dict[int, Any] = {}
    try:
        for _ in range(WORLD):
            rank, status, value = results.get(timeout=120)
            outcome[rank] = (status, value)
    except queue.Empty:
        pytest.fail(f"a rank did not finish: got only {outcome}")
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    return outcome


def exchange(collective: Collective) -> Any:
    shared = collective.broadcast(f"from rank {collective.rank}")
    gathered = collective.gather({"rank": collective.rank})
    every = collective.all_gather(collective.rank * 10)
    on_zero = collective.on_zero(lambda: "done once")
    return shared, gathered, every, on_zero


def rank_one_reward_fails(collective: Collective) -> Any:
    error = None
    try:
        if collective.rank == 1:
            raise ZeroDivisionError("reward broken on this shard")
    except ZeroDivisionError as exc:
        error = exc
    collective.check(error)
    return "not reached"


class _NeedsTwoArguments(Exception):
    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}")


def rank_zero_fails_unpicklably(collective: Collective) -> Any:
    def fail() -> None:
        raise _NeedsTwoArguments("train step", "service refused it")

    return collective.on_zero(fail)


def rank_one_never_comes(collective: Collective) -> Any:
    if collective.rank == 1:
        return "left"
    return collective.broadcast("anyone?")


@pytest.mark.slow
def test_objects_travel_between_two_processes() -> None:
    outcome = run_two(exchange)
    assert outcome[0] == (
        "ok",
        ("from rank 0", [{"rank": 0}, {"rank": 1}], [0, 10], "done once"),
    )
    assert outcome[1] == ("ok", ("from rank 0", None, [0, 10], "done once"))


def test_an_error_on_rank_one_ends_both_ranks_with_that_error_naming_rank_one() -> None:
    outcome = run_two(rank_one_reward_fails)
    for rank in (0, 1):
        status, (kind, message, _) = outcome[rank]
        assert (status, kind, message) == (
            "error",
            "ZeroDivisionError",
            "reward broken on this shard",
        )
    assert outcome[0][1][2] == ["raised on rank 1; every rank of the run stops with it"]
    # The rank that failed raises its own exception, untouched.
    assert outcome[1][1][2] == []


@pytest.mark.slow
def test_an_error_that_cannot_cross_processes_still_names_its_rank_and_text() -> None:
    outcome = run_two(rank_zero_fails_unpicklably)
    assert outcome[0] == ("error", ("_NeedsTwoArguments", "train step: service refused it", []))
    kind, message, _ = outcome[1][1]
    assert kind == RankFailedError.__name__
    assert message == "rank 0 failed with _NeedsTwoArguments: train step: service refused it"


@pytest.mark.slow
def test_a_rank_that_never_arrives_ends_the_wait_with_an_error_not_a_hang() -> None:
    outcome = run_two(rank_one_never_comes, timeout=5.0)
    assert outcome[1] == ("ok", "left")
    assert outcome[0][0] == "error"


def test_one_process_needs_no_process_group() -> None:
    collective = Collective.create()
    assert not collective.distributed
    assert collective.broadcast(3) == 3
    assert collective.gather("x") == ["x"]
    assert collective.on_zero(lambda: 5) == 5
    with pytest.raises(ValueError, match="bad sample"):
        collective.check(ValueError("bad sample"))
