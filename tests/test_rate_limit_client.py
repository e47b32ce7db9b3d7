"""The client's rate limiter at a service's limit: turns and found rates, on a fake clock.

No test sleeps: the clock is a number that moves when a test (as the client would, by
sleeping a wait) moves it.
"""

from __future__ import annotations

import pytest
from pydantic import SecretStr
from support import SleepClock

from lightning_moondream.api import TuningClient
from lightning_moondream.api.limiter import (
    BUSY_DECREASE,
    DOUBLING_RUN,
    FIRST_ANSWER_WAIT,
    HEADROOM,
    MIN_SUCCESS_RUN,
    POLL,
    REMEMBER,
    TIERS,
    RateLimiter,
    Reservation,
    limiter_for,
)


def settled(limiter: RateLimiter, clock: SleepClock, turn: Reservation) -> Reservation:
    """Wait a turn out as a client does: until it comes, then confirmations until it stands.

    The client's sleep began when it took the turn, so that time counts.
    """
    clock.now = max(clock.now, turn.at)
    while (turn := limiter.confirm(turn)).wait > 0:
        clock.sleep(turn.wait)
    return turn


# Turns -------------------------------------------------------------------------------


def test_the_second_request_keeps_its_spacing_from_the_first_answer() -> None:
    clock = SleepClock()
    limiter = RateLimiter(2.0, clock=clock)
    first = settled(limiter, clock, limiter.reserve())
    second, third = limiter.reserve(), limiter.reserve()
    assert (second.at - first.at, third.at - first.at) == (0.5, 1.0)
    clock.now = second.at
    # The first request, on a connection still opening, may not have arrived yet.
    held = limiter.confirm(second)
    assert (held.wait, held.confirmed) == (POLL, False)
    clock.now = first.at + 0.75
    limiter.record_success()
    assert settled(limiter, clock, held).at == pytest.approx(first.at + 0.75 + 0.5)
    # The turn behind it moves too: still half a second after the one before.
    assert settled(limiter, clock, third).at == pytest.approx(first.at + 0.75 + 1.0)


def test_the_second_request_waits_for_the_first_answer_only_so_long() -> None:
    clock = SleepClock()
    limiter = RateLimiter(2.0, clock=clock)
    first = settled(limiter, clock, limiter.reserve())
    # No answer comes (the first request failed to connect, say): the second goes anyway.
    second = settled(limiter, clock, limiter.reserve())
    assert second.at == pytest.approx(first.at + FIRST_ANSWER_WAIT)
    limiter.record_success()  # a late first answer moves no later turn
    assert settled(limiter, clock, limiter.reserve()).at == pytest.approx(second.at + 0.5)


def test_a_pause_ordered_while_a_turn_waited_holds_it_back() -> None:
    clock = SleepClock()
    limiter = RateLimiter(2.0, clock=clock)
    first = settled(limiter, clock, limiter.reserve())
    limiter.record_success()
    waiting = limiter.reserve()
    clock.now = first.at + 0.25
    limiter.record_rate_limited(first.at, retry_after=3.0)  # another client's 429
    assert settled(limiter, clock, waiting).at == pytest.approx(first.at + 0.25 + 3.0)


def test_a_late_start_pushes_the_turns_behind_it() -> None:
    clock = SleepClock()
    limiter = RateLimiter(2.0, clock=clock)
    first = settled(limiter, clock, limiter.reserve())
    limiter.record_success()
    second, third = limiter.reserve(), limiter.reserve()
    clock.now = second.at + 0.2  # woken late
    assert limiter.confirm(second).wait == 0.0
    assert settled(limiter, clock, third).at == pytest.approx(first.at + 0.7 + 0.5)


def test_a_tier_not_yet_tried_has_one_request_in_flight_until_two_are_admitted() -> None:
    clock = SleepClock()
    limiter = RateLimiter(clock=clock, tiers=TIERS)
    first = settled(limiter, clock, limiter.reserve())
    second, third = limiter.reserve(), limiter.reserve()
    clock.now = first.at + 0.05
    limiter.record_success()  # the first answer: it met a full bucket, which says little
    second = settled(limiter, clock, second)
    assert second.at == pytest.approx(first.at + 0.05 + 1 / TIERS[-1])
    # Were the tier too high, the third would be refused too: it waits for the second.
    clock.now = max(clock.now, third.at)
    held = limiter.confirm(third)
    assert (held.wait, held.confirmed) == (POLL, False)
    clock.now = second.at + 0.05
    limiter.record_success()  # the tier is tried: turns no longer wait for answers
    third = settled(limiter, clock, held)
    fourth = settled(limiter, clock, limiter.reserve())
    assert fourth.at - third.at == pytest.approx(1 / TIERS[-1])


def test_a_tier_too_high_costs_one_429_and_the_next_turn_keeps_the_lower_one() -> None:
    clock = SleepClock()
    limiter = RateLimiter(clock=clock, tiers=TIERS)
    first = settled(limiter, clock, limiter.reserve())
    clock.now = first.at + 0.05
    limiter.record_success()
    second = settled(limiter, clock, limiter.reserve())
    clock.now = second.at + 0.05
    limiter.record_rate_limited(second.at, retry_after=None)
    assert limiter.rate == TIERS[0]
    # The lower tier is taken as tried: the turns behind go at its pace, not one by one.
    third, fourth = (settled(limiter, clock, limiter.reserve()) for _ in range(2))
    assert fourth.at - third.at == pytest.approx(1 / TIERS[0])


def test_a_keys_shared_limiter_sends_a_little_under_the_rate_it_keeps() -> None:
    limiter = limiter_for("http://127.0.0.1:9/v1/tuning", SecretStr("sk-headroom-key"), 2.0)
    assert (limiter.rate, limiter.headroom) == (2.0, HEADROOM)
    with TuningClient(api_key="sk-headroom-key", base_url="http://127.0.0.1:9/v1/tuning") as client:
        assert client.rate_limiter is limiter
    clock = SleepClock()
    own = RateLimiter(2.0, clock=clock, headroom=HEADROOM)
    turns = [own.reserve().at for _ in range(3)]
    assert [later - turns[0] for later in turns[1:]] == [
        pytest.approx(0.5 / HEADROOM),
        pytest.approx(1.0 / HEADROOM),
    ]
    with pytest.raises(ValueError, match=r"headroom must be in \(0, 1\], got 1.5"):
        RateLimiter(headroom=1.5)


# Rates found and kept ------------------------------------------------------------------


def test_a_first_429_after_a_burst_starts_at_the_pace_its_retry_after_asks() -> None:
    clock = SleepClock()
    limiter = RateLimiter(clock=clock)
    sent = []
    for _ in range(8):  # a whole batch at once, nothing limits it yet
        sent.append(limiter.reserve().at)
        clock.now += 0.001
    limiter.record_rate_limited(sent[1], retry_after=1.0)
    # Not half the 1,000/s of the burst, each halving a 429 and a pause later.
    assert limiter.rate == 1.0
    for moment in sent[2:]:  # the same burst: no more slowing down
        limiter.record_rate_limited(moment, retry_after=1.0)
    assert limiter.rate == 1.0


def test_one_429_at_a_granted_rate_keeps_it_while_retry_after_vouches_for_it() -> None:
    clock = SleepClock()
    limiter = RateLimiter(clock=clock)
    limiter.set_rate(0.97)  # a process's share; its first request arrived a little late
    turn = settled(limiter, clock, limiter.reserve())
    limiter.record_rate_limited(turn.at, retry_after=1.0)
    assert limiter.rate == 0.97
    # Refused again after waiting the pause out: the key is busy with others' requests.
    retry = settled(limiter, clock, limiter.reserve(1.0))
    limiter.record_rate_limited(retry.at, retry_after=1.0)
    assert limiter.rate == pytest.approx(0.97 * BUSY_DECREASE)
    # Admitted again: the next Retry-After is taken at its word once more.
    limiter.record_success()
    clock.now += 10.0
    limiter.record_rate_limited(clock.now, retry_after=1.0)
    assert limiter.rate == 0.97


def test_a_found_rate_settles_under_the_lowest_rate_refused_for_a_while() -> None:
    clock = SleepClock()
    limiter = RateLimiter(clock=clock)
    limiter.reserve()
    clock.now += 1.0
    limiter.record_rate_limited(limiter.reserve().at, retry_after=2.0)
    assert limiter.rate == 0.5

    def successes(count: int) -> float | None:
        for _ in range(count):
            clock.now += 3.0  # one admitted request in any two seconds
            limiter.record_success()
        return limiter.rate

    # Nothing paced was refused yet: doubling, until a paced request is refused.
    assert [successes(DOUBLING_RUN) for _ in range(3)] == [1.0, 2.0, 4.0]
    limiter.record_rate_limited(clock.now, retry_after=None)
    assert limiter.rate == 2.0
    # Then halfway to the rate refused at most, or half a request per second more.
    assert successes(MIN_SUCCESS_RUN) == 2.5
    limiter.record_rate_limited(clock.now, retry_after=None)
    assert limiter.rate == 1.25
    rates = [successes(MIN_SUCCESS_RUN) for _ in range(10)]
    assert rates[:4] == [1.75, 2.125, 2.3125, 2.3125]
    assert set(rates[3:]) == {2.3125}  # within 10% of 2.5: no more probing over it
    clock.now += REMEMBER
    assert successes(DOUBLING_RUN) == 4.625
