"""The local service's per-key rate limit: token buckets read on an injected clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from support import serving

from lightning_moondream.api.inprocess import InProcessTransport
from lightning_moondream.images import encode_image
from lightning_moondream.server import create_app
from lightning_moondream.server.rate_limit import burst_of
from lightning_moondream.server.serve import app_from_args, build_parser

KEY = {"X-Moondream-Auth": "rate-key"}
OTHER = {"X-Moondream-Auth": "other-rate-key"}


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def client(tmp_path: Path, clock: FakeClock) -> Iterator[httpx.Client]:
    app = create_app(data_dir=tmp_path, policy="constant", rate_limit=2, clock=clock)
    with httpx.Client(
        transport=InProcessTransport(app), base_url="http://t/v1/tuning", headers=KEY
    ) as http:
        yield http


def assert_limited(response: httpx.Response, retry_after: str) -> None:
    assert response.status_code == 429
    assert response.headers["Retry-After"] == retry_after
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert error["message"].startswith("rate limit exceeded: at most ")


@pytest.mark.parametrize(
    ("rate", "burst"), [(0.01, 1), (2, 1), (5, 1), (5.5, 2), (10, 2), (100, 20)]
)
def test_the_burst_is_a_fifth_of_the_rate_rounded_up_and_at_least_one(
    rate: float, burst: int
) -> None:
    assert burst_of(rate) == burst


def test_the_second_immediate_request_is_429_until_a_token_refills(
    client: httpx.Client, clock: FakeClock
) -> None:
    assert client.get("/finetunes").status_code == 200
    refused = client.get("/finetunes")
    assert_limited(refused, "1")
    assert refused.json()["error"]["message"] == (
        "rate limit exceeded: at most 2 requests per second per API key (bursts of 1); retry in 1 s"
    )
    # A refused request takes no token: half a second later one is there.
    clock.now += 0.5
    assert client.get("/finetunes").status_code == 200
    assert_limited(client.get("/finetunes"), "1")
    clock.now += 0.375
    assert_limited(client.get("/finetunes"), "1")
    clock.now += 0.125
    assert client.get("/finetunes").status_code == 200


def test_each_key_has_its_own_bucket(client: httpx.Client) -> None:
    assert client.get("/finetunes").status_code == 200
    assert client.get("/adapters", headers=OTHER).status_code == 200
    assert_limited(client.get("/adapters"), "1")
    assert_limited(client.get("/adapters", headers=OTHER), "1")


def test_every_tuning_route_counts_and_is_refused(client: httpx.Client, clock: FakeClock) -> None:
    finetune_id = client.post("/finetunes", json={"name": "limited", "rank": 8}).json()[
        "finetune_id"
    ]
    calls = {
        "rollouts": lambda: client.post(
            "/rollouts",
            json={
                "finetune_id": finetune_id,
                "num_rollouts": 1,
                "request": {"skill": "query", "question": "q?"},
            },
        ),
        "train_step": lambda: client.post(
            "/train_step", json={"finetune_id": finetune_id, "groups": []}
        ),
        "save_checkpoint": lambda: client.post(f"/finetunes/{finetune_id}/checkpoints/save"),
        "list_checkpoints": lambda: client.get(f"/finetunes/{finetune_id}/checkpoints"),
        "get": lambda: client.get(f"/finetunes/{finetune_id}"),
        "delete": lambda: client.delete(f"/finetunes/{finetune_id}"),
    }
    for route, call in calls.items():
        answer = call()
        assert (route, answer.status_code) == (route, 429)
        clock.now += 0.5
        assert (route, call().status_code) != (route, 429)


def test_inference_routes_share_the_keys_bucket(client: httpx.Client, clock: FakeClock) -> None:
    # The key's one token goes to a tuning call; the inference call right after waits.
    assert client.get("/finetunes").status_code == 200
    detect = {"object": "circle", "image_url": encode_image(Image.new("RGB", (32, 32)))}
    inference = client.post("http://t/v1/detect", json=detect)
    assert_limited(inference, "1")
    clock.now += 0.5
    assert client.post("http://t/v1/detect", json=detect).status_code == 200


def test_a_slow_rate_asks_to_retry_after_the_time_to_the_next_token(
    tmp_path: Path, clock: FakeClock
) -> None:
    app = create_app(data_dir=tmp_path, policy="constant", rate_limit=0.25, clock=clock)
    with httpx.Client(transport=InProcessTransport(app), base_url="http://t/v1/tuning") as http:
        assert http.get("/adapters", headers=KEY).status_code == 200
        assert_limited(http.get("/adapters", headers=KEY), "4")
        clock.now += 2.5
        assert_limited(http.get("/adapters", headers=KEY), "2")


@pytest.mark.parametrize("rate", [0, -1, float("nan"), float("inf")])
def test_a_rate_limit_must_be_a_positive_number(tmp_path: Path, rate: float) -> None:
    with pytest.raises(ValueError, match="rate_limit must be a positive number"):
        create_app(data_dir=tmp_path, rate_limit=rate)


def test_serve_rate_limit_over_http_a_burst_then_429(tmp_path: Path, clock: FakeClock) -> None:
    args = build_parser().parse_args(
        ["--rate-limit", "20", "--policy", "constant", "--data-dir", str(tmp_path)]
    )
    assert args.rate_limit == 20.0
    assert build_parser().parse_args([]).rate_limit is None
    with serving(app_from_args(args, None, clock)) as url, httpx.Client(headers=KEY) as http:
        burst = [http.get(f"{url}/finetunes").status_code for _ in range(4)]
        assert burst == [200, 200, 200, 200]
        assert_limited(http.get(f"{url}/finetunes"), "1")
        assert http.get(f"{url}/finetunes", headers=OTHER).status_code == 200
        clock.now += 0.05
        assert http.get(f"{url}/finetunes").status_code == 200
