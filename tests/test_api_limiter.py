"""The rate limiter of an API key, alone and in both clients, on a fake clock.

No test sleeps: the clock is a number the fake ``sleep`` moves forward.
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import httpx
import pytest
from support import SleepClock

from lightning_moondream.api import (
    AsyncTuningClient,
    RateLimitError,
    TuningClient,
    UsageStats,
)
from lightning_moondream.api.limiter import TIERS, RateLimiter

KEY = "sk-limiter-5ecret-key"
BASE = "https://tuning.example/v1/tuning"
ADAPTER = {"adapter_id": "a", "name": "a", "rank": 16}


class Service:
    """Answers with the statuses given, then 200; remembers when each request came."""

    def __init__(self, clock: SleepClock, *statuses: int, retry_after: str | None = None) -> None:
        self.clock = clock
        self.statuses = list(statuses)
        self.retry_after = retry_after
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.times.append(self.clock.now)
        if self.statuses:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            body = {"error": {"message": "slow down"}}
            return httpx.Response(self.statuses.pop(0), json=body, headers=headers)
        return httpx.Response(200, json=ADAPTER)


def client_of(service: Service, limiter: RateLimiter, **kwargs: Any) -> TuningClient:
    client = TuningClient(
        api_key=KEY,
        base_url=BASE,
        dialect="adapters",
        http_client=httpx.Client(transport=httpx.MockTransport(service)),
        rate_limiter=limiter,
        **kwargs,
    )
    client._sleep = service.clock.sleep  # type: ignore[method-assign]
    return client


# A configured rate --------------------------------------------------------------------


def test_a_configured_rate_spaces_requests_evenly() -> None:
    clock = SleepClock()
    service = Service(clock)
    client = client_of(service, RateLimiter(2.0, clock=clock))
    for _ in range(5):
        client.adapters.get("a")
    assert clock.slept == [0.5] * 4
    assert [t - service.times[0] for t in service.times] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert client.usage.admitted_rate == 2.0


def test_the_async_client_keeps_the_same_pace() -> None:
    clock = SleepClock()
    service = Service(clock)

    async def run() -> None:
        async with AsyncTuningClient(
            api_key=KEY,
            base_url=BASE,
            dialect="adapters",
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(service)),
            rate_limiter=RateLimiter(4.0, clock=clock),
        ) as client:
            client._sleep = clock.async_sleep  # type: ignore[method-assign]
            for _ in range(3):
                await client.adapters.get("a")

    asyncio.run(run())
    assert clock.slept == [0.25, 0.25]


def test_a_granted_share_sets_the_rate_and_its_ceiling() -> None:
    clock = SleepClock()
    limiter = RateLimiter(10.0, clock=clock)
    limiter.set_rate(0.5)  # e.g. a tenth of a funded key's 5 per process
    assert limiter.rate == 0.5
    assert limiter.reserve().wait == 0.0 and limiter.reserve().wait == 2.0
    for _ in range(20):
        limiter.record_success()
    assert limiter.rate == 0.5
    with pytest.raises(ValueError, match="requests_per_second must be a number > 0, got 0"):
        limiter.set_rate(0)


# 429: pause, slow down, never give up for them alone -----------------------------------


def test_retry_after_pauses_every_request_of_the_key() -> None:
    clock = SleepClock()
    limiter = RateLimiter(clock=clock)
    turn = limiter.reserve()
    limiter.record_rate_limited(turn.at, retry_after=3.0)
    # Another client of the key, about to send: it waits the pause out too.
    assert limiter.reserve().wait == 3.0


def test_429s_are_waited_out_without_counting_against_max_retries() -> None:
    clock = SleepClock()
    service = Service(clock, 429, 429, 429, 429, 429, retry_after="2")
    client = client_of(service, RateLimiter(clock=clock), max_retries=0)
    assert client.adapters.get("a").adapter_id == "a"
    assert len(service.times) == 6 and len(clock.slept) == 5
    # Retry-After is a floor; 429 after 429, the key's pace slows down beyond it.
    assert clock.slept[:2] == [2.0, 2.0] and clock.slept == sorted(clock.slept)
    assert (client.usage.rate_limited, client.usage.failures) == (5, 0)
    assert client.usage.admitted_rate == client.rate_limiter.rate < 0.5


def test_a_call_gives_up_on_429s_only_after_the_long_cap() -> None:
    clock = SleepClock()
    service = Service(clock, *[429] * 10, retry_after="4")
    client = client_of(service, RateLimiter(clock=clock))
    client.retry_policy.max_rate_limited_wait = 10.0
    with pytest.raises(RateLimitError) as raised:
        client.adapters.get("a")
    assert raised.value.retry_after == 4.0
    assert clock.slept == [4.0, 4.0] and len(service.times) == 3


def test_without_a_configured_rate_429s_find_one_and_successes_raise_it() -> None:
    clock = SleepClock()
    limiter = RateLimiter(clock=clock)
    sent = []
    for _ in range(5):  # 10 requests per second, nothing limits them yet
        sent.append(limiter.reserve().at)
        clock.now += 0.1
    assert limiter.rate is None
    limiter.record_rate_limited(sent[-1], retry_after=None)
    assert limiter.rate == pytest.approx(5.0)  # half the 10/s it was sending at
    limiter.record_rate_limited(sent[-2], retry_after=None)  # same congestion: no change
    assert limiter.rate == pytest.approx(5.0)
    later = limiter.reserve().at
    limiter.record_rate_limited(later, retry_after=None)
    assert limiter.rate == pytest.approx(2.5)
    for _ in range(4):
        limiter.record_success()
    assert limiter.rate == pytest.approx(3.0)


def test_a_found_rate_starts_at_the_top_tier_and_a_429_finds_the_tier_below() -> None:
    clock = SleepClock()
    limiter = RateLimiter(clock=clock, tiers=TIERS)
    assert limiter.rate == 10.0
    first, second = limiter.reserve().at, limiter.reserve().at
    assert second - first == pytest.approx(0.1)
    clock.now = second + 0.05  # the answers come
    limiter.record_rate_limited(second, retry_after=1.0)
    assert limiter.rate == 2.0
    limiter.record_rate_limited(first, retry_after=1.0)  # the same congestion: no change
    assert limiter.rate == 2.0
    # At the lowest tier, a 429 of a request sent at it slows down as a configured rate.
    clock.now += 1.0
    limiter.record_success()
    limiter.record_rate_limited(limiter.reserve().at, retry_after=None)
    assert limiter.rate == pytest.approx(1.0)
    for _ in range(4):
        limiter.record_success()
    assert limiter.rate == pytest.approx(1.5)


def test_a_lower_tier_is_left_for_the_next_only_after_a_long_clean_spell() -> None:
    clock = SleepClock()
    limiter = RateLimiter(clock=clock, tiers=TIERS)
    limiter.record_rate_limited(limiter.reserve().at, retry_after=None)
    assert limiter.rate == 2.0
    for _ in range(20):
        clock.now += 0.5
        limiter.record_success()
    assert limiter.rate == 2.0  # ten seconds at 2/s: a 429 at 10/s is still remembered
    clock.now += 600.0
    limiter.record_success()
    assert limiter.rate == 10.0


def test_a_429_of_a_key_busy_with_others_finds_no_lower_tier() -> None:
    clock = SleepClock()
    limiter = RateLimiter(clock=clock, tiers=TIERS)
    limiter.record_rate_limited(limiter.reserve().at, retry_after=1.0)  # 10 -> 2
    clock.now += 1.0  # the pause waited out, and refused again with nothing admitted
    limiter.record_rate_limited(limiter.reserve().at, retry_after=1.0)
    assert limiter.rate == pytest.approx(2.0 * 0.8)


def test_processes_of_a_run_take_equal_shares_of_the_tier_on_staggered_turns() -> None:
    clock = SleepClock()
    limiters = [RateLimiter(clock=clock, tiers=TIERS) for _ in range(2)]
    for rank, limiter in enumerate(limiters):
        limiter.share(rank, 2)
    assert [limiter.rate for limiter in limiters] == [5.0, 5.0]
    limiters[1].record_rate_limited(clock.now, retry_after=None)
    assert [limiter.rate for limiter in limiters] == [5.0, 1.0]


def test_a_service_that_sets_no_limit_is_sent_to_unpaced_but_a_configured_rate_stays() -> None:
    clock = SleepClock()
    found = RateLimiter(clock=clock, tiers=TIERS)
    found.record_unlimited()
    assert found.rate is None
    assert found.reserve().wait == found.reserve().wait == 0.0
    configured = RateLimiter(clock=clock, tiers=TIERS)
    configured.set_rate(3.0)
    configured.record_unlimited()
    assert configured.rate == 3.0


def test_a_429_asking_for_no_wait_changes_no_rate() -> None:
    clock = SleepClock()
    limiter = RateLimiter(4.0, clock=clock)
    limiter.record_rate_limited(limiter.reserve().at, retry_after=0.0)
    assert limiter.rate == 4.0
    limiter.record_rate_limited(limiter.reserve().at, retry_after=1.0)
    assert limiter.rate == 2.0


def test_a_decrease_never_goes_below_what_the_service_admitted() -> None:
    clock = SleepClock()
    limiter = RateLimiter(5.0, clock=clock)
    for _ in range(8):  # 4 requests per second admitted over the last two seconds
        turn = limiter.reserve()
        clock.now = turn.at
        limiter.record_success()
    limiter.record_rate_limited(clock.now, retry_after=None)
    assert limiter.rate == pytest.approx(4.0)


# One limiter per key and service, in usage --------------------------------------------


def test_clients_of_one_key_share_one_limiter() -> None:
    first = TuningClient(api_key="sk-shared-key-1", base_url=BASE, requests_per_second=3)
    second = TuningClient(api_key="sk-shared-key-1", base_url=BASE)
    other_key = TuningClient(api_key="sk-shared-key-2", base_url=BASE)
    other_service = TuningClient(api_key="sk-shared-key-1", base_url=BASE + "/other")
    try:
        assert first.rate_limiter is second.rate_limiter
        assert second.rate_limiter.rate == 3.0
        assert other_key.rate_limiter is not first.rate_limiter
        assert other_service.rate_limiter is not first.rate_limiter
        assert "sk-shared-key-1" not in str(first.__dict__)
    finally:
        for client in (first, second, other_key, other_service):
            client.close()


def test_rate_limited_counts_and_admitted_rates_add_up_across_processes() -> None:
    one, two = UsageStats(), UsageStats()
    one.record_rate_limited()
    one.record_admitted_rate(1.0)
    two.record_rate_limited()
    two.record_rate_limited()
    two.record_admitted_rate(0.5)
    restored = pickle.loads(pickle.dumps(one))
    assert (restored.rate_limited, restored.admitted_rate) == (1, 1.0)
    total = UsageStats.combined([restored.state(), two.state()])
    assert (total.rate_limited, total.admitted_rate) == (3, 1.5)
    assert total.snapshot()["rate_limited"] == 3
    older = {key: value for key, value in one.state().items() if key != "admitted_rate"}
    assert UsageStats.combined([older]).admitted_rate == 0.0
