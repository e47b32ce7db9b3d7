"""The ``/finetunes`` facts of Moondream's API reference, on the local service over HTTP.

Ranks, names, idempotent creation (409 on another rank), the finetune listing, rollout
counts, point ground truth, request defaults and idempotent deletes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import moondream
import pytest
from support import free_port, serve_command, serving, wait_for_serve

from lightning_moondream.api.models import parse_request
from lightning_moondream.data import synthetic
from lightning_moondream.images import encode_image
from lightning_moondream.rewards import ground_truth_reward
from lightning_moondream.server import create_app
from lightning_moondream.server.validation import ParsedRequest

KEY = "finetune-rules-key"
HEADERS = {"X-Moondream-Auth": KEY}
FINETUNE_FIELDS = {
    "finetune_id",
    "name",
    "rank",
    "created_at_ms",
    "updated_at_ms",
    "train_steps",
}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    app = create_app(data_dir=tmp_path_factory.mktemp("finetune-rules"), seed=5)
    with serving(app) as url:
        yield url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers=HEADERS) as client:
        yield client


def _scene(index: int) -> tuple[str, str, list[tuple[float, float, float, float]]]:
    scene = synthetic.make_scene(synthetic.split_seed("val", index))
    phrase, boxes = synthetic.detect_tasks(scene)[0]
    return encode_image(scene.image), phrase, boxes


def _create(http: httpx.Client, name: str, rank: int) -> httpx.Response:
    return http.post("/finetunes", json={"name": name, "rank": rank})


@pytest.mark.parametrize("rank", [8, 16, 24, 32])
def test_finetunes_take_ranks_8_to_32_in_steps_of_8(http: httpx.Client, rank: int) -> None:
    made = _create(http, f"rank-{rank}", rank)
    assert made.status_code == 200, made.text
    answer = http.get(f"/finetunes/{made.json()['finetune_id']}").json()
    assert answer["finetune"]["rank"] == rank


@pytest.mark.parametrize("rank", [8, 24])
def test_adapters_keep_ranks_16_and_32(http: httpx.Client, rank: int) -> None:
    refused = http.post("/adapters", json={"name": "a", "rank": rank})
    assert refused.status_code == 422
    assert refused.json()["error"]["message"] == f"rank: must be one of 16, 32, got {rank}"


@pytest.mark.parametrize("name", ["has space", "slash/name", "émoji", "semi;colon"])
def test_a_name_outside_letters_digits_dots_hyphens_underscores_is_422(
    http: httpx.Client, name: str
) -> None:
    refused = _create(http, name, 16)
    assert refused.status_code == 422
    assert refused.json()["error"]["message"].startswith("name: ")


def test_creation_is_idempotent_by_name_and_409_for_another_rank(http: httpx.Client) -> None:
    first = _create(http, "Run_1.v2-final", 16).json()["finetune_id"]
    assert _create(http, "Run_1.v2-final", 16).json() == {"finetune_id": first}
    conflict = _create(http, "Run_1.v2-final", 32)
    assert conflict.status_code == 409
    assert conflict.json()["error"] == {
        "type": "conflict_error",
        "message": "name: a finetune named 'Run_1.v2-final' already exists with rank 16",
    }
    # Another key's finetune of the same name is another finetune.
    other = http.post(
        "/finetunes",
        json={"name": "Run_1.v2-final", "rank": 32},
        headers={"X-Moondream-Auth": "another-rules-key"},
    )
    assert other.status_code == 200 and other.json()["finetune_id"] != first
    # Once deleted, the name makes a new finetune.
    assert http.delete(f"/finetunes/{first}").json() == {"ok": True}
    assert _create(http, "Run_1.v2-final", 32).json()["finetune_id"] != first


def test_concurrent_creations_of_one_name_make_one_finetune(tmp_path: Path) -> None:
    app = create_app(data_dir=tmp_path, policy="constant")

    async def create_many() -> set[str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t/v1/tuning", headers=HEADERS
        ) as client:
            answers = await asyncio.gather(
                *(client.post("/finetunes", json={"name": "same", "rank": 8}) for _ in range(8))
            )
            listed = (await client.get("/finetunes")).json()["finetunes"]
        assert [finetune["name"] for finetune in listed] == ["same"]
        return {answer.json()["finetune_id"] for answer in answers}

    assert len(asyncio.run(create_many())) == 1


def test_finetunes_are_listed_oldest_first_by_pages(tmp_path: Path) -> None:
    with (
        serving(create_app(data_dir=tmp_path, policy="constant")) as url,
        httpx.Client(base_url=url, headers=HEADERS) as http,
    ):
        assert http.get("/finetunes").json() == {
            "finetunes": [],
            "next_cursor": None,
            "has_more": False,
        }
        ids = [_create(http, f"list-{index}", 8).json()["finetune_id"] for index in range(3)]
        first = http.get("/finetunes", params={"limit": 2}).json()
        assert [item["finetune_id"] for item in first["finetunes"]] == ids[:2]
        assert first["has_more"] is True
        assert set(first["finetunes"][0]) == FINETUNE_FIELDS
        assert first["finetunes"][0]["name"] == "list-0" and first["finetunes"][0]["rank"] == 8
        rest = http.get("/finetunes", params={"limit": 2, "cursor": first["next_cursor"]}).json()
        assert [item["finetune_id"] for item in rest["finetunes"]] == ids[2:]
        assert (rest["has_more"], rest["next_cursor"]) == (False, None)
        for limit in (0, 101):
            refused = http.get("/finetunes", params={"limit": limit})
            assert refused.status_code == 422
            assert refused.json()["error"]["message"].startswith("limit: ")
        mine = http.get("/finetunes", headers={"X-Moondream-Auth": "someone-else"}).json()
        assert mine["finetunes"] == []


@pytest.mark.parametrize("count", [1, 16])
def test_one_to_sixteen_rollouts(http: httpx.Client, count: int) -> None:
    finetune_id = _create(http, "counts", 8).json()["finetune_id"]
    image_url, phrase, _ = _scene(0)
    answer = http.post(
        "/rollouts",
        json={
            "finetune_id": finetune_id,
            "num_rollouts": count,
            "request": {"skill": "point", "object": phrase, "image_url": image_url},
        },
    )
    assert answer.status_code == 200 and len(answer.json()["rollouts"]) == count


@pytest.mark.parametrize("kind", ["points", "boxes"])
def test_point_ground_truth_as_points_or_boxes(http: httpx.Client, kind: str) -> None:
    finetune_id = _create(http, "point-truth", 8).json()["finetune_id"]
    image_url, phrase, boxes = _scene(1)
    corners = [dict(zip(("x_min", "y_min", "x_max", "y_max"), box, strict=True)) for box in boxes]
    truth: dict[str, Any] = (
        {"boxes": corners}
        if kind == "boxes"
        else {"points": [{"x": (b[0] + b[2]) / 2, "y": (b[1] + b[3]) / 2} for b in boxes]}
    )
    answer = http.post(
        "/rollouts",
        json={
            "finetune_id": finetune_id,
            "num_rollouts": 8,
            "request": {"skill": "point", "object": phrase, "image_url": image_url},
            "ground_truth": truth,
        },
    ).json()
    expected = [ground_truth_reward("point", r["output"], truth) for r in answer["rollouts"]]
    assert answer["rewards"] == pytest.approx(expected)
    assert all(0.0 <= reward <= 1.0 for reward in answer["rewards"])
    assert max(answer["rewards"]) > 0.0


@pytest.mark.parametrize(
    ("request_json", "max_tokens", "max_objects"),
    [
        ({"skill": "detect", "object": "o"}, 256, 50),
        ({"skill": "detect", "object": "o", "settings": {"temperature": 0.5}}, 256, 50),
        ({"skill": "detect", "object": "o", "settings": {"max_tokens": 40}}, 40, 50),
        ({"skill": "detect", "object": "o", "settings": {"max_objects": 3}}, 256, 3),
        ({"skill": "point", "object": "o"}, 128, None),
        ({"skill": "query", "question": "q?"}, 128, None),
    ],
)
def test_request_defaults_follow_the_api_reference(
    request_json: dict[str, Any], max_tokens: int, max_objects: int | None
) -> None:
    body = dict(request_json)
    if body["skill"] != "query":
        body["image_url"] = encode_image(synthetic.make_scene(1).image)
    parsed = ParsedRequest(parse_request(body))
    assert (parsed.max_tokens, parsed.max_objects) == (max_tokens, max_objects)


def _sft_step(finetune_id: str, boxes: int, settings: dict[str, Any] | None) -> dict[str, Any]:
    image_url, phrase, _ = _scene(2)
    request: dict[str, Any] = {"skill": "detect", "object": phrase, "image_url": image_url}
    if settings is not None:
        request["settings"] = settings
    width = 0.8 / boxes
    target = {
        "boxes": [
            {"x_min": 0.1 + i * width, "y_min": 0.1, "x_max": 0.1 + (i + 0.5) * width, "y_max": 0.5}
            for i in range(boxes)
        ]
    }
    return {
        "finetune_id": finetune_id,
        "lr": 0,
        "groups": [{"mode": "sft", "request": request, "target": target}],
    }


def test_a_detect_request_without_max_objects_takes_more_than_eight_objects(
    http: httpx.Client,
) -> None:
    finetune_id = _create(http, "defaults", 8).json()["finetune_id"]
    measured = http.post("/train_step", json=_sft_step(finetune_id, 12, None))
    assert measured.status_code == 200, measured.text
    assert measured.json()["applied"] is False and measured.json()["sft_loss"] > 0
    capped = http.post("/train_step", json=_sft_step(finetune_id, 12, {"max_objects": 8}))
    assert capped.status_code == 422
    assert capped.json()["error"]["message"] == (
        "groups[0].target: 12 objects, more than the request's 8 at most"
    )


def test_deletes_are_idempotent_and_answer_ok(http: httpx.Client) -> None:
    finetune_id = _create(http, "deletes", 8).json()["finetune_id"]
    saved = http.post(f"/finetunes/{finetune_id}/checkpoints/save").json()["checkpoint"]
    for _ in range(2):
        answer = http.delete(f"/finetunes/{finetune_id}/checkpoints/{saved['step']}")
        assert (answer.status_code, answer.json()) == (200, {"ok": True})
    assert http.get(f"/finetunes/{finetune_id}/checkpoints").json()["checkpoints"] == []
    never = http.delete(f"/finetunes/{finetune_id}/checkpoints/5")
    assert never.status_code == 404
    other = http.delete(f"/finetunes/{finetune_id}", headers={"X-Moondream-Auth": "not-the-owner"})
    assert other.status_code == 404

    for _ in range(2):
        answer = http.delete(f"/finetunes/{finetune_id}")
        assert (answer.status_code, answer.json()) == (200, {"ok": True})
    assert http.get(f"/finetunes/{finetune_id}").status_code == 404
    # The finetune's checkpoints went with it: no step of it can be deleted any more.
    gone = http.delete(f"/finetunes/{finetune_id}/checkpoints/{saved['step']}")
    assert gone.status_code == 404 and finetune_id in gone.json()["error"]["message"]
    assert http.delete("/finetunes/0123456789abcdef").status_code == 404


def test_the_sdk_makes_a_rank_8_finetune_and_sees_it_listed_by_serve(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        serve_command(port, tmp_path, "--policy", "constant", "--api-key", KEY),
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/tuning"
        wait_for_serve(process, f"{url}/finetunes", KEY)
        ft = moondream.ft(KEY, name="sdk-rank-8", rank=8, endpoint=url)
        again = moondream.ft(KEY, name="sdk-rank-8", rank=8, endpoint=url)
        assert again.finetune_id == ft.finetune_id
        reread = moondream.ft(KEY, finetune_id=ft.finetune_id, endpoint=url)
        assert (reread.name, reread.rank) == ("sdk-rank-8", 8)
        # The SDK has no call listing finetunes: the listing is read as any client would.
        listed = httpx.get(f"{url}/finetunes", headers=HEADERS).json()
        assert [
            (item["finetune_id"], item["name"], item["rank"]) for item in listed["finetunes"]
        ] == [(ft.finetune_id, "sdk-rank-8", 8)]
        ft.delete()
        ft.delete()
        assert httpx.get(f"{url}/finetunes", headers=HEADERS).json()["finetunes"] == []
    finally:
        process.terminate()
        process.wait(timeout=30)
