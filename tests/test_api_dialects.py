"""Both wire dialects over ``httpx.MockTransport`` fakes that follow each wire exactly.

The fakes (``api_fakes``) each speak one dialect and answer any other route with
FastAPI's ``404 {"detail": "Not Found"}``, as a service without that route would.
"""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_fakes import (
    BASE,
    DATA_URL,
    KEY,
    SFT_QUERY,
    AdaptersService,
    Fake,
    FinetunesService,
    async_client_of,
    client_of,
    detect_group,
    error,
)

from lightning_moondream.api import (
    AmbiguousRequestError,
    AsyncTuningClient,
    InvalidRequestError,
    NotFoundError,
    QueryRequest,
    TuningClient,
    UnsupportedFeatureError,
)

# Every route of the /finetunes wire ----------------------------------------------------


def test_every_finetunes_route_follows_the_sdk_wire() -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    adapter = client.adapters.create("cats", 16)
    assert (adapter.adapter_id, adapter.name, adapter.rank) == ("ft_1", "cats", 16)
    assert client.adapters.get("ft_1").train_steps == 0

    group = detect_group(client, "ft_1")
    result = client.train_step("ft_1", [group, SFT_QUERY], lr=1e-4, weight_decay=0.0)
    assert (result.step, result.applied, result.kl, result.grad_norm) == (1, True, 0.01, 1.5)
    assert result.sft_loss is None and result.reward_std == 0.25

    assert client.metrics.log("ft_1", 1, {"reward": 0.5, "loss": 2}) == 2
    assert [(m["name"], m["value"]) for m in client.metrics.read("ft_1")] == [
        ("reward", 0.5),
        ("loss", 2.0),
    ]
    saved = client.checkpoints.save("ft_1")
    assert (saved.adapter_id, saved.step, saved.ref) == ("ft_1", 1, "ft_1@1")
    assert saved.model_id == "moondream3-preview/ft_1@1"
    assert saved.expires_at_ms is not None
    assert [c.ref for c in client.checkpoints.iter("ft_1")] == ["ft_1@1"]
    client.checkpoints.delete(saved.ref)
    assert list(client.checkpoints.iter("ft_1")) == []
    client.adapters.delete("ft_1")

    bodies = dict(zip(fake.calls(), fake.bodies(), strict=False))
    assert fake.calls() == [
        ("POST", "/finetunes"),
        ("GET", "/finetunes/ft_1"),
        ("POST", "/rollouts"),
        ("POST", "/train_step"),
        ("POST", "/finetunes/ft_1/metrics"),
        ("GET", "/finetunes/ft_1/metrics"),
        ("POST", "/finetunes/ft_1/checkpoints/save"),
        ("GET", "/finetunes/ft_1/checkpoints"),
        ("DELETE", "/finetunes/ft_1/checkpoints/1"),
        ("GET", "/finetunes/ft_1/checkpoints"),
        ("DELETE", "/finetunes/ft_1"),
    ]
    assert bodies[("POST", "/finetunes")] == {"name": "cats", "rank": 16}
    assert bodies[("POST", "/rollouts")]["finetune_id"] == "ft_1"
    step = bodies[("POST", "/train_step")]
    assert step["finetune_id"] == "ft_1" and "adapter_id" not in step
    assert (step["lr"], step["weight_decay"]) == (1e-4, 0.0)
    assert [g["mode"] for g in step["groups"]] == ["rl", "sft"]
    assert step["groups"][0]["rewards"] == [1.0, 0.0]
    assert step["groups"][1]["target"] == {"answer": "a cat", "reasoning": "whiskers"}
    assert bodies[("POST", "/finetunes/ft_1/metrics")] == {
        "step": 1,
        "metrics": {"reward": 0.5, "loss": 2.0},
    }


def test_a_finetune_answered_unwrapped_reads_the_same() -> None:
    fake = FinetunesService(wrap=False)
    client = client_of(fake, "finetunes")
    client.adapters.create("cats", 32)
    adapter = client.adapters.get("ft_1")
    assert (adapter.adapter_id, adapter.rank, adapter.train_steps) == ("ft_1", 32, 0)


def test_detect_rollouts_read_boxes_from_objects_and_send_the_raw_json_back() -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    client.adapters.create("cats", 16)
    response = client.rollouts(
        "ft_1", {"skill": "detect", "object": "cat", "image_url": DATA_URL}, 2
    )
    assert [box.as_tuple() for box in response.rollouts[0].boxes] == [(0.1, 0.2, 0.4, 0.6)]
    client.train_step("ft_1", [response.to_group([1.0, 0.0])])
    sent = fake.bodies()[-1]["groups"][0]["rollouts"]
    assert sent == response.raw["rollouts"] and "objects" in sent[0]["output"]


def test_reasoning_and_spatial_refs_reach_the_wire_and_come_back() -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    client.adapters.create("cats", 16)
    request = QueryRequest(
        question="what is here?", reasoning=True, spatial_refs=[[0.5, 0.5], [0.1, 0.1, 0.3, 0.4]]
    )
    response = client.rollouts("ft_1", request, 1)
    assert fake.bodies()[-1]["request"]["reasoning"] is True
    assert fake.bodies()[-1]["request"]["spatial_refs"] == [[0.5, 0.5], [0.1, 0.1, 0.3, 0.4]]
    rollout = response.rollouts[0]
    assert rollout.reasoning is not None and rollout.reasoning["text"] == "it has whiskers"
    assert rollout.raw["thinking_tokens"] == [7, 8]


@pytest.mark.parametrize(
    ("refs", "words"),
    [
        ([[0.5]], "2 numbers (a point) or 4"),
        ([[0.5, 1.5]], "within 0 to 1"),
        ([[0.4, 0.1, 0.2, 0.3]], "x1 < x2"),
        ([[math.nan, 0.1]], "finite"),
    ],
    ids=["short", "out-of-range", "inverted-box", "nan"],
)
def test_bad_spatial_refs_are_refused_before_sending(refs: list[Any], words: str) -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    with pytest.raises(InvalidRequestError, match="spatial_refs") as raised:
        client.rollouts("ft_1", {"skill": "query", "question": "q", "spatial_refs": refs}, 1)
    assert words in str(raised.value)
    assert fake.requests == []


# The /adapters wire keeps its shapes ---------------------------------------------------


def test_adapters_train_step_answers_an_empty_result_and_sends_no_mode() -> None:
    fake = AdaptersService()
    client = client_of(fake, "adapters")
    client.adapters.create("cats", 16)
    result = client.train_step("ad_1", [detect_group(client, "ad_1")])
    assert result.step is None and result.applied is None and result.kl is None
    assert "mode" not in fake.bodies()[-1]["groups"][0]
    assert fake.bodies()[-1]["adapter_id"] == "ad_1"
    saved = client.checkpoints.save("ad_1")
    assert saved.ref == "ad_1/chk_1" and saved.model_id is None and saved.adapter_id == "ad_1"


# Features a dialect cannot carry fail before anything is sent --------------------------


@pytest.mark.parametrize(
    ("call", "feature"),
    [
        (lambda c: c.train_step("ad_1", [SFT_QUERY]), "SFT groups"),
        (
            lambda c: c.train_step(
                "ad_1", [{"request": {"skill": "query"}, "rollouts": [{}], "rewards": [1]}], lr=0.1
            ),
            "learning rate",
        ),
        (lambda c: c.metrics.log("ad_1", 0, {"reward": 1.0}), "logging metrics"),
        (lambda c: c.metrics.read("ad_1"), "reading metrics"),
        (
            lambda c: c.rollouts("ad_1", {"skill": "query", "question": "q", "reasoning": True}, 1),
            "reasoning",
        ),
    ],
    ids=["sft", "lr", "metrics-log", "metrics-read", "reasoning"],
)
def test_what_adapters_cannot_carry_fails_before_sending(call: Any, feature: str) -> None:
    fake = AdaptersService()
    client = client_of(fake, "adapters")
    with pytest.raises(UnsupportedFeatureError, match=feature) as raised:
        call(client)
    assert raised.value.dialect == "adapters" and "/adapters" in str(raised.value)
    assert fake.requests == []


def test_what_finetunes_cannot_carry_fails_before_sending() -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    with pytest.raises(UnsupportedFeatureError, match="from a checkpoint"):
        client.adapters.create("x", 16, from_checkpoint="ft_1/chk_1")
    assert fake.requests == []


# Bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (
            lambda c: c.train_step("ft_1", [{"mode": "sft", "request": {"skill": "query"}}]),
            "groups[0]: an SFT group needs a target",
        ),
        (
            lambda c: c.train_step(
                "ft_1",
                [
                    {
                        "mode": "sft",
                        "request": {"skill": "detect"},
                        "target": {
                            "boxes": [{"x_min": 0.5, "y_min": 0.1, "x_max": 0.2, "y_max": 0.3}]
                        },
                    }
                ],
            ),
            "x_min (0.5) must be less than x_max",
        ),
        (
            lambda c: c.train_step(
                "ft_1", [{"mode": "sft", "request": {"skill": "query"}, "target": {"answer": ""}}]
            ),
            "target.answer must be a non-empty string",
        ),
        (lambda c: c.train_step("ft_1", [SFT_QUERY], lr=-1.0), "lr must be a finite number >= 0"),
        (lambda c: c.train_step("ft_1", [SFT_QUERY], lr=math.inf), "lr must be a finite number"),
        (lambda c: c.train_step("ft_1", [SFT_QUERY], lr=math.nan), "lr must be a finite number"),
        (lambda c: c.metrics.log("ft_1", 1, {"loss": math.nan}), "metric 'loss' must be a finite"),
        (
            lambda c: c.metrics.log("ft_1", 1, {"reward": 0.5, "loss": -math.inf}),
            "metric 'loss' must be a finite number, got -inf",
        ),
        (
            lambda c: c.metrics.log("ft_1", 1, {"loss": "0.5"}),
            "metric 'loss' must be a finite number, got '0.5'",
        ),
        (
            lambda c: c.metrics.log("ft_1", 1, {"done": True}),
            "metric 'done' must be a finite number, got True",
        ),
        (lambda c: c.metrics.log("ft_1", 1, {"": 1.0}), "names must be non-empty strings"),
        (lambda c: c.metrics.log("ft_1", -1, {"loss": 1.0}), "step must be an integer >= 0"),
    ],
    ids=[
        "sft-no-target",
        "sft-inverted-box",
        "sft-empty-answer",
        "negative-lr",
        "infinite-lr",
        "nan-lr",
        "nan-metric",
        "infinite-metric",
        "string-metric",
        "bool-metric",
        "empty-metric-name",
        "negative-step",
    ],
)
def test_bad_input_is_refused_before_sending_even_before_detection(call: Any, words: str) -> None:
    fake = FinetunesService()
    client = client_of(fake)  # auto: not even a detection request goes out
    with pytest.raises(InvalidRequestError) as raised:
        call(client)
    assert words in str(raised.value)
    assert fake.requests == []


UNKNOWN_DIALECT: Any = "cloud"


@pytest.mark.parametrize(
    "make",
    [
        lambda data_dir: TuningClient(api_key=KEY, base_url=BASE, dialect=UNKNOWN_DIALECT),
        lambda data_dir: AsyncTuningClient(api_key=KEY, base_url=BASE, dialect=UNKNOWN_DIALECT),
        lambda data_dir: TuningClient.local(data_dir=data_dir, dialect=UNKNOWN_DIALECT),
        lambda data_dir: AsyncTuningClient.local(data_dir=data_dir, dialect=UNKNOWN_DIALECT),
    ],
    ids=["client", "async-client", "local", "async-local"],
)
def test_an_unknown_dialect_name_is_refused_before_anything_is_made(
    make: Any, tmp_path: Path
) -> None:
    service_dir = tmp_path / "service"
    with pytest.raises(
        ValueError, match="dialect must be one of auto, adapters, finetunes, got 'cloud'"
    ):
        make(service_dir)
    # Not even a local service's folder, key or database.
    assert not service_dir.exists()


# Detection -----------------------------------------------------------------------------


def test_detection_on_a_finetunes_only_service(caplog: pytest.LogCaptureFixture) -> None:
    fake = FinetunesService()
    client = client_of(fake)
    assert client.dialect is None
    with caplog.at_level(logging.INFO, logger="lightning_moondream.api.plans"):
        client.adapters.create("cats", 16)
        client.adapters.create("dogs", 16)
    assert client.dialect == "finetunes"
    assert fake.calls() == [("POST", "/finetunes"), ("POST", "/finetunes")]
    assert [r.getMessage() for r in caplog.records].count(
        f"the tuning API at {BASE} speaks the /finetunes dialect"
    ) == 1
    assert [adapter.name for adapter in client.adapters.iter()] == ["cats", "dogs"]


def test_detection_on_an_adapters_only_service_creates_one_adapter() -> None:
    fake = AdaptersService()
    client = client_of(fake)
    adapter = client.adapters.create("cats", 16)
    assert adapter.adapter_id == "ad_1" and client.dialect == "adapters"
    assert fake.calls() == [("POST", "/finetunes"), ("POST", "/adapters")]
    assert list(fake.adapters) == ["ad_1"]


def test_attaching_detects_with_reads_only() -> None:
    fake = AdaptersService()
    fake.adapters["ad_9"] = {"adapter_id": "ad_9", "name": "x", "rank": 16}
    client = client_of(fake)
    client.train_step(
        "ad_9",
        [{"request": {"skill": "query", "question": "q"}, "rollouts": [{}], "rewards": [1.0]}],
    )
    assert client.dialect == "adapters"
    assert fake.calls() == [
        ("GET", "/finetunes/ad_9"),
        ("GET", "/adapters/ad_9"),
        ("POST", "/train_step"),
    ]


def test_a_missing_adapter_does_not_decide_the_dialect() -> None:
    fake = FinetunesService()
    client = client_of(fake)
    with pytest.raises(NotFoundError, match="'ft_404' not found in either dialect"):
        client.checkpoints.save("ft_404")
    assert client.dialect is None
    # Nothing was created to find out: only reads were sent.
    assert fake.calls() == [("GET", "/finetunes/ft_404"), ("GET", "/adapters/ft_404")]
    client.adapters.create("cats", 16)
    client.adapters.get("ft_1")
    assert client.dialect == "finetunes"


def test_a_missing_adapter_after_detection_is_plain_not_found() -> None:
    fake = FinetunesService()
    client = client_of(fake)
    client.adapters.create("cats", 16)
    with pytest.raises(NotFoundError, match="finetune ft_404 not found"):
        client.adapters.get("ft_404")
    assert client.dialect == "finetunes"
    assert fake.calls()[-1] == ("GET", "/finetunes/ft_404")


@pytest.mark.parametrize("service", [FinetunesService, AdaptersService])
def test_listing_first_decides_the_dialect_with_reads_only(service: type[Fake]) -> None:
    fake = service()
    client = client_of(fake)
    assert client.adapters.list().items == []
    expected = "finetunes" if service is FinetunesService else "adapters"
    assert client.dialect == expected
    assert [method for method, _ in fake.calls()] == ["GET"] * len(fake.calls())
    assert fake.calls()[-1] == ("GET", f"/{expected}")


def test_async_client_detects_and_trains_the_same_way() -> None:
    fake = FinetunesService()

    async def run() -> Any:
        async with async_client_of(fake) as client:
            await client.adapters.create("cats", 16)
            result = await client.train_step("ft_1", [SFT_QUERY], lr=0.5)
            await client.metrics.log("ft_1", result.step or 0, {"loss": 1.0})
            saved = await client.checkpoints.save("ft_1")
            return client.dialect, result.step, saved.ref

    assert asyncio.run(run()) == ("finetunes", 1, "ft_1@1")


# Unknown outcomes ----------------------------------------------------------------------


def service_of(dialect: str) -> Fake:
    """A fake service speaking ``dialect`` alone."""
    return AdaptersService() if dialect == "adapters" else FinetunesService()


@pytest.mark.parametrize(
    ("dialect", "failure", "created", "calls"),
    [
        # /adapters lists adapters: the client finds the one it made.
        ("adapters", "drop", "ad_1", [("POST", "/adapters"), ("GET", "/adapters")]),
        # /finetunes creation is idempotent: the second request names the first one's.
        ("finetunes", "500", "ft_1", [("POST", "/finetunes")] * 2),
        ("finetunes", "drop", "ft_1", [("POST", "/finetunes")] * 2),
    ],
    ids=["adapters-drop-found-by-listing", "finetunes-500-sent-again", "finetunes-drop-sent-again"],
)
def test_an_unknown_creation_is_settled_without_an_orphan(
    dialect: str, failure: str, created: str, calls: list[tuple[str, str]]
) -> None:
    fake = service_of(dialect)
    fake.fail_next[("POST", f"/{dialect}")] = failure
    client = client_of(fake, dialect)
    assert client.adapters.create("cats", 16).adapter_id == created
    assert fake.calls() == calls
    # The first request made it, and it is the only one the service holds.
    assert [adapter.adapter_id for adapter in client.adapters.iter()] == [created]


@pytest.mark.parametrize("dialect", ["adapters", "finetunes"])
def test_an_unknown_checkpoint_save_returns_the_checkpoint_made(dialect: str) -> None:
    fake = service_of(dialect)
    client = client_of(fake, dialect)
    adapter_id = client.adapters.create("cats", 16).adapter_id
    first = client.checkpoints.save(adapter_id)
    save_path = fake.calls()[-1][1]
    client.train_step(adapter_id, [detect_group(client, adapter_id)])
    fake.fail_next[("POST", save_path)] = "drop"
    second = client.checkpoints.save(adapter_id)
    assert second.ref != first.ref
    assert [c.ref for c in client.checkpoints.iter(adapter_id)][-1] == second.ref
    # The save was sent once, then resolved by listing: never repeated.
    assert [call for call in fake.calls() if call == ("POST", save_path)] == [
        ("POST", save_path),
        ("POST", save_path),
    ]


def test_a_save_whose_lookup_fails_stays_ambiguous() -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    client.adapters.create("cats", 16)
    fake.fail_next[("POST", "/finetunes/ft_1/checkpoints/save")] = "500"
    fake.answer = lambda *args: httpx.Response(500)  # type: ignore[method-assign]
    with pytest.raises(AmbiguousRequestError, match="listing the checkpoints of ft_1 failed"):
        client.checkpoints.save("ft_1")


def test_secrets_stay_out_of_errors_and_reprs() -> None:
    fake = FinetunesService()
    client = client_of(fake, max_retries=0)
    fake.answer = lambda *args: error(404, f"no key {KEY}")  # type: ignore[method-assign]
    with pytest.raises(NotFoundError) as raised:
        client.adapters.get("ft_1")
    for text in (str(raised.value), repr(raised.value), repr(client)):
        assert KEY not in text
    assert "dialect=None" in repr(client)


def test_a_reader_of_the_adapters_wire_refuses_sft_groups() -> None:
    from lightning_moondream.api.models import check_groups

    with pytest.raises(ValueError, match=r"groups\[0\].mode must be 'rl' \(SFT groups need"):
        check_groups([SFT_QUERY])
    assert check_groups([SFT_QUERY], allow_sft=True)[0]["target"] == SFT_QUERY["target"]


def test_two_candidates_for_an_unknown_creation_stay_ambiguous() -> None:
    fake = AdaptersService()
    client = client_of(fake, "adapters")
    client.adapters.create("cats", 16)
    fake.fail_next[("POST", "/adapters")] = "drop"
    with pytest.raises(
        AmbiguousRequestError, match="2 adapters named 'cats' with rank 16"
    ) as raised:
        client.adapters.create("cats", 16)
    assert "ad_1, ad_2" in str(raised.value)
    assert fake.calls()[-2:] == [("POST", "/adapters"), ("GET", "/adapters")]


def test_usage_statistics_name_each_finetunes_route_once() -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    client.adapters.create("cats", 16)
    client.checkpoints.save("ft_1")
    client.checkpoints.delete("ft_1@0")
    for endpoint in (
        "POST /finetunes",
        "POST /finetunes/:adapter_id/checkpoints/save",
        "DELETE /finetunes/:adapter_id/checkpoints/:checkpoint_id",
    ):
        assert len(client.usage.latencies(endpoint)) == 1, endpoint


def test_async_client_resolves_an_unknown_save_the_same_way() -> None:
    fake = FinetunesService()
    fake.fail_next[("POST", "/finetunes/ft_1/checkpoints/save")] = "drop"

    async def run() -> str:
        async with async_client_of(fake) as client:
            await client.adapters.create("cats", 16)
            return (await client.checkpoints.save("ft_1")).ref

    assert asyncio.run(run()) == "ft_1@0"
    assert fake.calls() == [
        ("POST", "/finetunes"),
        ("POST", "/finetunes/ft_1/checkpoints/save"),
        ("GET", "/finetunes/ft_1/checkpoints"),
    ]
