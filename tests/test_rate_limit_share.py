"""Sharing one API key's rate among a run's processes, on numbers and a fake clock.

No test sleeps or reads a wall-clock duration: turns are the limiter's reservations on
a clock that only moves when told, and the shares are arithmetic.
"""

from __future__ import annotations

import itertools

import pytest
from pydantic import SecretStr

from lightning_moondream import MoondreamRLModule
from lightning_moondream.api import UsageStats
from lightning_moondream.api.limiter import HEADROOM, TIERS, RateLimiter, Turns
from lightning_moondream.distributed import Collective
from lightning_moondream.scoring import Scorer
from lightning_moondream.session import RemoteStep, ServiceChoice, Session, SessionOptions, Shard
from lightning_moondream.session.connection import Connection
from lightning_moondream.session.rate_share import Pace, RateShare
from lightning_moondream.session.sampling import concurrency

KEY = SecretStr("sk-share-5ecret-key")


def remote_choice(port: int) -> ServiceChoice:
    # Nothing listens there: no test here sends a request.
    return ServiceChoice(api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1/tuning")


def connection_of(rank: int, processes: int, rate: float | None, port: int) -> Connection:
    connection = Connection(remote_choice(port), UsageStats(), print, rate)
    connection.prepare(Collective(None, rank, processes), ".")
    return connection


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_each_process_is_granted_an_equal_share_of_the_configured_rate() -> None:
    limiters = [connection_of(rank, 2, 10.0, 9001).client.rate_limiter for rank in (0, 1)]
    assert [limiter.rate for limiter in limiters] == [pytest.approx(10.0 / 2)] * 2
    # Sent a little under it: a request late on its turn still arrives 1 / rate after.
    assert [limiter.headroom for limiter in limiters] == [HEADROOM] * 2


def test_one_process_takes_the_whole_rate_and_without_one_its_share_of_the_top_tier() -> None:
    assert connection_of(0, 1, 2.0, 9002).client.rate_limiter.rate == pytest.approx(2.0)
    assert connection_of(0, 1, None, 9003).client.rate_limiter.rate == TIERS[-1]
    # Two processes (two services here, as each process has its own limiter of the key).
    limiters = [connection_of(rank, 2, None, 9005 + rank).client.rate_limiter for rank in (0, 1)]
    assert [limiter.rate for limiter in limiters] == [TIERS[-1] / 2] * 2


def test_staggered_turns_of_two_processes_space_the_key_evenly() -> None:
    clock = Clock()
    limiters = [RateLimiter(clock=clock, headroom=HEADROOM) for _ in range(2)]
    for rank, limiter in enumerate(limiters):
        turns = Turns.of(10.0, rank, 2)
        limiter.set_rate(turns.rate, phase=turns.phase)
    # Both processes ask at the same instant, four requests each.
    starts = sorted(limiter.reserve().at for limiter in limiters for _ in range(4))
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert gaps == [pytest.approx(0.1 / HEADROOM, abs=1e-3)] * 7


def test_a_process_alone_has_no_turns_to_keep_clear_of() -> None:
    assert Turns.of(2.0, 0, 1) == Turns(2.0, None)


def test_a_process_slowed_by_a_429_keeps_to_its_own_turns() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    limiter.set_rate(5.0, phase=0.05)
    first = limiter.reserve().at
    limiter.record_rate_limited(sent_at=first, retry_after=None)
    assert limiter.rate == pytest.approx(2.5)
    later = [limiter.reserve().at for _ in range(3)]
    # Every turn is still phase + k / 5: the other process's turns stay free.
    for moment in later:
        assert (moment - 0.05) * 5 == pytest.approx(round((moment - 0.05) * 5), abs=1e-6)
    # The turn after the first was taken at the old rate; every other turn is skipped after.
    gaps = [b - a for a, b in itertools.pairwise([first, *later])]
    assert gaps == [pytest.approx(0.2), pytest.approx(0.4), pytest.approx(0.4)]


def test_nothing_is_granted_without_a_configured_rate() -> None:
    share = RateShare(None, 2)
    assert share.key_rate is None
    # Rank 1 met 429s: its limiter found a lower tier; rank 0 will find it alike.
    assert share.update([Pace(5.0, 0), Pace(1.0, 2)]) is None


def test_a_configured_key_rate_is_never_exceeded() -> None:
    share = RateShare(10.0, 2)
    assert share.key_rate == pytest.approx(10.0)
    assert share.update([Pace(5.0, 0), Pace(5.0, 0)]) == pytest.approx(10.0)
    assert share.update([Pace(5.0, 0), Pace(2.0, 1)]) == pytest.approx(7.0)
    assert share.update([Pace(3.5, 0), Pace(3.5, 1)]) == pytest.approx(8.0)
    for _ in range(3):
        rate = share.update([Pace(3.5, 0), Pace(3.5, 1)])
    assert rate == pytest.approx(10.0)


def test_a_rate_granted_at_a_train_step_paces_the_next_one() -> None:
    connection = connection_of(0, 2, 10.0, 9004)
    connection.follow(6.0)
    assert connection.client.rate_limiter.rate == pytest.approx(3.0)
    assert connection.pace() == Pace(pytest.approx(3.0), 0)


def test_the_step_carries_every_ranks_pace_and_grants_the_key_rate() -> None:
    session = Session(
        SessionOptions(requests_per_second=4.0, max_retries=0), remote_choice(9005), Scorer()
    )
    step = RemoteStep(
        session.connection,
        max_staleness=0,
        max_retries=0,
        on_ambiguous_step="raise",
        resume_hint=str,
    )
    # No group has signal: nothing is sent, yet the paces are counted and logged.
    step.add(Shard(rewards=[[1.0, 1.0]]))
    step.add(Shard(pace=Pace(3.5, 3)))
    with pytest.warns(UserWarning, match="nothing to learn from"):
        report = step.step(Collective(), "ft", lr=None)
    # The rank met 429s and came down to 3.5/s under its 4: the key's rate follows.
    assert report.key_rate == 3.5
    assert report.metrics["admitted_rps"] == 3.5
    assert report.metrics["rate_limited"] == 3.0


def test_in_flight_follows_littles_law_once_rate_and_latency_are_known() -> None:
    connection = connection_of(0, 1, 10.0, 9006)
    connection.client  # noqa: B018 - connected, as when a batch is taught
    assert connection.in_flight() is None
    for _ in range(10):
        connection.usage.record_attempt("POST /rollouts", 0.5, 0)
    # 10/s x 0.5 s = 5 in flight, plus one.
    assert connection.in_flight() == 6
    assert connection_of(0, 1, None, 9007).in_flight() is None


@pytest.mark.parametrize(
    ("max_concurrency", "in_flight", "expected"),
    [(None, None, 32), (None, 6, 6), (None, 100, 32), (3, 6, 3)],
    ids=["whole-batch", "littles-law", "capped-by-batch", "configured"],
)
def test_the_default_concurrency(
    max_concurrency: int | None, in_flight: int | None, expected: int
) -> None:
    assert concurrency(max_concurrency, 32, in_flight) == expected


@pytest.mark.parametrize("value", [0, -2.0, float("inf"), float("nan")])
def test_a_rate_that_cannot_work_is_refused_naming_the_option(value: float) -> None:
    with pytest.raises(ValueError, match="requests_per_second must be a finite number > 0"):
        MoondreamRLModule(requests_per_second=value)


def test_the_module_passes_its_rate_to_its_connection() -> None:
    module = MoondreamRLModule(requests_per_second=2)
    assert module.hparams["requests_per_second"] == 2
    assert module.session.connection.requests_per_second == 2
