"""The local service checks the API key before its rate limit, on an injected clock."""

from __future__ import annotations

from pathlib import Path

import httpx
from support import serving

from lightning_moondream.api import TuningClient
from lightning_moondream.api.inprocess import InProcessTransport
from lightning_moondream.api.limiter import TIERS
from lightning_moondream.server import create_app
from lightning_moondream.server.rate_limit import RateLimiter

KEY = {"X-Moondream-Auth": "rate-key"}
SECOND_KEY = {"X-Moondream-Auth": "second-rate-key"}
KEYS = ["rate-key", "second-rate-key"]


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_missing_or_wrong_key_is_401_even_when_the_limit_is_spent(tmp_path: Path) -> None:
    app = create_app(
        data_dir=tmp_path, policy="constant", api_keys=KEYS, rate_limit=2, clock=FakeClock()
    )
    with serving(app) as url, httpx.Client(base_url=url) as http:
        # Requests without a key used to share one bucket: the second was refused 429.
        for _ in range(3):
            missing = http.get("/finetunes")
            assert missing.status_code == 401
            assert missing.json()["error"]["message"].startswith("missing API key")
        assert http.get("/finetunes", headers=KEY).status_code == 200
        assert http.get("/finetunes", headers=KEY).status_code == 429
        # The clock stands still: the key's bucket stays empty, and the others are 401.
        assert http.get("/finetunes").status_code == 401
        for _ in range(3):
            wrong = http.get("/finetunes", headers={"X-Moondream-Auth": "made-up"})
            assert (wrong.status_code, wrong.json()["error"]["message"]) == (
                401,
                "invalid API key",
            )
        assert http.get("/finetunes", headers=KEY).status_code == 429


def test_made_up_keys_take_no_bucket_so_cannot_push_a_real_keys_out(tmp_path: Path) -> None:
    app = create_app(
        data_dir=tmp_path, policy="constant", api_keys=KEYS, rate_limit=2, clock=FakeClock()
    )
    # A cache of one bucket (set before the first request builds the middleware), so
    # that any other key's bucket evicts the real key's, which then starts again full.
    app.rate_limiter = RateLimiter(2, app.rate_limiter.clock, max_buckets=1)
    with httpx.Client(transport=InProcessTransport(app), base_url="http://t/v1/tuning") as http:
        assert http.get("/finetunes", headers=KEY).status_code == 200
        assert http.get("/finetunes", headers=KEY).status_code == 429
        for index in range(5):
            made_up = {"X-Moondream-Auth": f"made-up-{index}"}
            assert http.get("/finetunes", headers=made_up).status_code == 401
        assert http.get("/finetunes").status_code == 401
        # Still the real key's spent bucket: none of those took its place.
        assert http.get("/finetunes", headers=KEY).status_code == 429
        # Another accepted key does take a bucket, and evicts the first one's.
        assert http.get("/finetunes", headers=SECOND_KEY).status_code == 200
        assert http.get("/finetunes", headers=KEY).status_code == 200


def test_the_service_tells_clients_when_it_sets_no_limit(tmp_path: Path) -> None:
    unlimited = create_app(data_dir=tmp_path / "free", policy="constant", api_keys=KEYS)
    limited = create_app(
        data_dir=tmp_path / "limited", policy="constant", api_keys=KEYS, rate_limit=2
    )
    with serving(unlimited) as free_url, serving(limited) as limited_url:
        rates = {}
        for name, url in (("free", free_url), ("limited", limited_url)):
            with TuningClient(api_key=KEYS[0], base_url=url) as client:
                assert client.rate_limiter.rate == TIERS[-1]  # a guess, before any answer
                client.adapters.list()
                rates[name] = client.rate_limiter.rate
    # Told, the client sends unpaced; a limited service says nothing, as Moondream Cloud.
    assert rates == {"free": None, "limited": TIERS[-1]}
