"""Moondream's API reference, on the client: ranks, idempotent creation and deletes,
listing finetunes, defaults and limits, over the ``/finetunes`` fake of ``api_fakes``.

Each fake answers with the JSON that Moondream's documentation gives for its route.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from api_fakes import (
    BASE,
    BOX,
    DATA_URL,
    KEY,
    AdaptersService,
    Fake,
    FinetunesService,
    client_of,
)

from lightning_moondream.api import (
    APITimeoutError,
    AsyncTuningClient,
    ConflictError,
    DetectRequest,
    InvalidRequestError,
    NotFoundError,
    QueryRequest,
    RolloutCall,
    ServerError,
    Settings,
)

# Ranks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["finetunes", "auto"])
@pytest.mark.parametrize("rank", [8, 16, 24, 32])
def test_finetunes_takes_every_documented_rank(dialect: str, rank: int) -> None:
    fake = FinetunesService()
    client = client_of(fake, dialect)
    adapter = client.adapters.create("quickstart", rank)
    assert (adapter.adapter_id, adapter.rank) == ("ft_1", rank)
    assert fake.bodies() == [{"name": "quickstart", "rank": rank}]


@pytest.mark.parametrize(
    ("service", "dialect", "rank", "words"),
    [
        (AdaptersService, "adapters", 8, "rank must be 16 or 32 on the /adapters dialect, got 8"),
        (
            FinetunesService,
            "finetunes",
            12,
            "rank must be 8, 16, 24 or 32 on the /finetunes dialect, got 12",
        ),
    ],
    ids=["adapters", "finetunes"],
)
def test_a_rank_the_dialect_refuses_is_named_before_sending(
    service: type[Fake], dialect: str, rank: int, words: str
) -> None:
    fake = service()
    client = client_of(fake, dialect)
    with pytest.raises(InvalidRequestError) as raised:
        client.adapters.create("quickstart", rank)
    assert words in str(raised.value)
    assert fake.requests == []


def test_on_auto_the_rank_is_checked_against_the_dialect_found() -> None:
    fake = AdaptersService()
    client = client_of(fake)
    with pytest.raises(InvalidRequestError, match="16 or 32 on the /adapters dialect, got 24"):
        client.adapters.create("quickstart", 24)
    # /finetunes has no route here; /adapters is never sent a rank it refuses.
    assert fake.calls() == [("POST", "/finetunes")]
    assert fake.adapters == {}


# Creation is idempotent by name and rank ------------------------------------------------


def test_creating_the_same_finetune_twice_returns_the_same_one() -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    first = client.adapters.create("cats", 8)
    again = client.adapters.create("cats", 8)
    assert first.adapter_id == again.adapter_id == "ft_1"
    assert list(fake.finetunes) == ["ft_1"]


def test_the_same_name_with_another_rank_is_a_clear_conflict() -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    client.adapters.create("cats", 8)
    with pytest.raises(ConflictError) as raised:
        client.adapters.create("cats", 32)
    message = str(raised.value)
    assert "a finetune named 'cats' already exists with a rank other than 32" in message
    assert raised.value.status_code == 409
    assert KEY not in message


def test_a_creation_lost_until_retries_run_out_is_not_called_ambiguous() -> None:
    fake = FinetunesService()
    fake.fail_next[("POST", "/finetunes")] = "drop"
    client = client_of(fake, "finetunes", max_retries=0)
    # Sending it again is safe, so the caller is told what failed, not "maybe applied".
    with pytest.raises(APITimeoutError) as raised:
        client.adapters.create("cats", 16)
    assert "may or may not" not in str(raised.value)
    assert client.adapters.create("cats", 16).adapter_id == "ft_1"
    assert list(fake.finetunes) == ["ft_1"]


# Listing finetunes ---------------------------------------------------------------------


def test_listing_finetunes_pages_oldest_first_into_adapters() -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    for name, rank in (("a", 8), ("b", 16), ("c", 24)):
        client.adapters.create(name, rank)
    page = client.adapters.list(limit=2)
    assert [(a.adapter_id, a.name, a.rank) for a in page.items] == [
        ("ft_1", "a", 8),
        ("ft_2", "b", 16),
    ]
    assert page.next_cursor == "2"
    assert all(adapter.created_at_ms for adapter in page.items)
    assert [a.name for a in client.adapters.iter(limit=1)] == ["a", "b", "c"]
    assert ("GET", "/finetunes") in fake.calls()


def test_async_listing_finetunes_reads_the_same() -> None:
    fake = FinetunesService()
    fake.answer("POST", "/finetunes", {"name": "cats", "rank": 8}, {})  # made by another program

    async def run() -> list[str]:
        async with AsyncTuningClient(
            api_key=KEY,
            base_url=BASE,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(fake)),
        ) as client:
            return [adapter.name async for adapter in client.adapters.iter()]

    assert asyncio.run(run()) == ["cats"]


# Deletes are idempotent; {ok: ...} answers are read ------------------------------------


def test_deleting_a_finetune_checkpoint_twice_is_no_error() -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    client.adapters.create("cats", 16)
    ref = client.checkpoints.save("ft_1").ref
    client.checkpoints.delete(ref)
    client.checkpoints.delete(ref)
    assert fake.calls()[-2:] == [("DELETE", "/finetunes/ft_1/checkpoints/0")] * 2
    assert list(client.checkpoints.iter("ft_1")) == []


def test_deleting_an_adapters_checkpoint_that_never_was_is_not_found() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "checkpoint not found"}})

    client = client_of(handler, "adapters")  # type: ignore[arg-type]
    with pytest.raises(NotFoundError, match="checkpoint not found"):
        client.checkpoints.delete("ad_1/chk_9")


def test_a_delete_whose_answer_was_lost_is_done_when_the_retry_finds_it_gone() -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    client.adapters.create("cats", 16)
    fake.fail_next[("DELETE", "/finetunes/ft_1")] = "drop"
    client.adapters.delete("ft_1")
    assert fake.calls()[-2:] == [("DELETE", "/finetunes/ft_1")] * 2
    assert fake.finetunes == {}


def test_an_answer_saying_not_ok_is_an_error() -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes", max_retries=0)
    client.adapters.create("cats", 16)
    fake.answer = lambda *args: httpx.Response(200, json={"ok": False})  # type: ignore[method-assign]
    with pytest.raises(ServerError, match=re.escape('answered {"ok": false}')):
        client.adapters.delete("ft_1")


def test_metrics_and_saves_read_their_ok_answers() -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    client.adapters.create("cats", 16)
    assert client.metrics.log("ft_1", 0, {"reward": 0.5}) == 1
    assert client.checkpoints.save("ft_1").ref == "ft_1@0"


# Requests: rollouts, ground truth, defaults and limits ---------------------------------


@pytest.mark.parametrize("truth", [{"points": [{"x": 0.2, "y": 0.3}]}, {"boxes": [BOX]}])
def test_point_ground_truth_goes_as_points_or_boxes(truth: dict[str, Any]) -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    client.adapters.create("cats", 16)
    request = {"skill": "point", "object": "cat", "image_url": DATA_URL}
    client.rollouts("ft_1", request, 16, truth)
    body = fake.bodies()[-1]
    assert body["ground_truth"] == truth and body["num_rollouts"] == 16


def test_more_than_sixteen_rollouts_are_refused() -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    request = {"skill": "query", "question": "q"}
    with pytest.raises(InvalidRequestError, match="num_rollouts must be an integer from 1 to 16"):
        client.rollouts("ft_1", request, 17)
    assert fake.requests == []


def test_detect_settings_send_only_what_was_given() -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    client.adapters.create("cats", 16)
    detect = DetectRequest(object="cat", image_url=DATA_URL, settings=Settings(temperature=0.5))
    # The service's detect defaults apply: max_tokens 256, max_objects 50.
    assert detect.settings is not None and detect.settings.max_tokens == 256
    client.rollouts("ft_1", detect, 1)
    assert fake.bodies()[-1]["request"]["settings"] == {"temperature": 0.5}
    client.rollouts("ft_1", DetectRequest(object="cat", image_url=DATA_URL), 1)
    assert "settings" not in fake.bodies()[-1]["request"]


def test_the_client_refuses_more_spatial_refs_than_the_service() -> None:
    fake = FinetunesService()
    client = client_of(fake, "finetunes")
    client.adapters.create("cats", 16)
    refs = [[0.5, 0.5]] * 64
    client.rollouts("ft_1", QueryRequest(question="q", spatial_refs=refs), 1)
    sent = len(fake.requests)
    with pytest.raises(InvalidRequestError) as raised:
        client.rollouts("ft_1", {"skill": "query", "question": "q", "spatial_refs": refs * 2}, 1)
    assert "request.spatial_refs" in str(raised.value) and "64" in str(raised.value)
    with pytest.raises(InvalidRequestError, match="spatial_refs"):
        client.rollouts(
            "ft_1", {"skill": "query", "question": "q", "spatial_refs": refs + refs[:1]}, 1
        )
    assert len(fake.requests) == sent


# The dialect is decided once -----------------------------------------------------------


def test_a_decided_dialect_is_kept_by_every_later_call() -> None:
    fake = FinetunesService()
    client = client_of(fake)
    client.adapters.create("cats", 16)
    assert client.dialect == "finetunes"
    client.rollouts("ft_1", {"skill": "query", "question": "q"}, 1)
    client.checkpoints.save("ft_1")
    # Only an /adapters checkpoint id names /adapters, for the one call that uses it.
    with pytest.raises(NotFoundError):
        client.adapters.create("dogs", 16, from_checkpoint="ad_1/chk_1")
    assert client.dialect == "finetunes"
    assert fake.calls() == [
        ("POST", "/finetunes"),
        ("POST", "/rollouts"),
        ("POST", "/finetunes/ft_1/checkpoints/save"),
        ("POST", "/adapters"),
    ]


def test_many_rollouts_decide_the_dialect_with_one_read() -> None:
    fake = FinetunesService()
    fake.answer("POST", "/finetunes", {"name": "a", "rank": 8}, {})
    fake.answer("POST", "/finetunes", {"name": "b", "rank": 8}, {})
    client = client_of(fake)
    request = {"skill": "query", "question": "q"}
    calls = [RolloutCall(adapter_id, request, 2) for adapter_id in ("ft_1", "ft_2", "ft_1")]
    responses = client.rollouts_many(calls)
    assert [len(response) for response in responses] == [2, 2, 2]
    assert fake.calls()[0] == ("GET", "/finetunes/ft_1")
    assert fake.calls()[1:] == [("POST", "/rollouts")] * 3
    assert [body["finetune_id"] for body in fake.bodies()[1:]] == ["ft_1", "ft_2", "ft_1"]
    assert client.usage.rollouts == 6
