"""The client against the local service over HTTP, on Moondream's /finetunes reference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from support import serving

from lightning_moondream.api import ConflictError, InvalidRequestError, TuningClient
from lightning_moondream.api.limits import MAX_SPATIAL_REFS
from lightning_moondream.images import encode_image
from lightning_moondream.server import close_app, create_app

KEY = "contract-key"


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    app = create_app(data_dir=tmp_path, api_keys=[KEY], policy="constant", dialect="finetunes")
    try:
        with serving(app) as url:
            yield url
    finally:
        close_app(app)


@pytest.fixture
def client(url: str) -> Iterator[TuningClient]:
    with TuningClient(api_key=KEY, base_url=url) as client:
        yield client


@pytest.mark.parametrize("rank", [8, 16, 24, 32])
def test_every_documented_rank_creates_a_finetune(client: TuningClient, rank: int) -> None:
    finetune = client.adapters.create(f"ranked-{rank}", rank)
    assert (finetune.rank, client.dialect) == (rank, "finetunes")


def test_creating_by_name_is_idempotent_and_another_rank_is_a_conflict(
    client: TuningClient,
) -> None:
    first = client.adapters.create("by-name", 8)
    assert client.adapters.create("by-name", 8).adapter_id == first.adapter_id
    with pytest.raises(ConflictError, match="by-name"):
        client.adapters.create("by-name", 16)
    assert [finetune.adapter_id for finetune in client.adapters.iter()] == [first.adapter_id]


def test_listing_pages_through_every_finetune_oldest_first(client: TuningClient) -> None:
    made = [client.adapters.create(f"listed-{index}", 8).adapter_id for index in range(5)]
    page = client.adapters.list(limit=2)
    assert page.next_cursor and [item.adapter_id for item in page.items] == made[:2]
    assert [item.adapter_id for item in client.adapters.iter(limit=2)] == made


def test_a_checkpoint_deleted_twice_is_gone_without_error(client: TuningClient) -> None:
    finetune = client.adapters.create("deletes", 8)
    saved = client.checkpoints.save(finetune.adapter_id)
    client.checkpoints.delete(saved.ref)
    client.checkpoints.delete(saved.ref)
    assert list(client.checkpoints.iter(finetune.adapter_id)) == []


def test_the_client_and_the_service_refuse_the_same_number_of_spatial_refs(
    client: TuningClient, url: str
) -> None:
    finetune = client.adapters.create("refs", 8)
    image = encode_image(Image.new("RGB", (32, 32)))
    request = {"skill": "query", "question": "what?", "image_url": image}
    at_limit = [[0.5, 0.5]] * MAX_SPATIAL_REFS
    answered = client.rollouts(finetune.adapter_id, {**request, "spatial_refs": at_limit}, 1)
    assert len(answered.rollouts) == 1
    with pytest.raises(InvalidRequestError, match="spatial_refs"):
        client.rollouts(
            finetune.adapter_id, {**request, "spatial_refs": [*at_limit, [0.1, 0.1]]}, 1
        )
    over = {**request, "spatial_refs": [*at_limit, [0.1, 0.1]]}
    body = {"finetune_id": finetune.adapter_id, "num_rollouts": 1, "request": over}
    answer = httpx.post(f"{url}/rollouts", json=body, headers={"X-Moondream-Auth": KEY})
    assert answer.status_code == 422 and "spatial_refs" in answer.text
