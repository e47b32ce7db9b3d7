"""The local tuning service in-process: endpoints, validation, auth, isolation, state."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from lightning_moondream.api.inprocess import InProcessAsyncTransport, InProcessTransport
from lightning_moondream.data import synthetic
from lightning_moondream.images import encode_image
from lightning_moondream.server import FaultConfig, close_app, create_app

KEY = {"X-Moondream-Auth": "key-a"}
OTHER = {"X-Moondream-Auth": "key-b"}
URL = "/v1/tuning"


def scene_request(index: int = 0, skill: str = "detect", **settings: Any) -> tuple[dict, dict]:
    scene = synthetic.make_scene(synthetic.split_seed("val", index))
    phrase, boxes = synthetic.detect_tasks(scene)[0]
    request: dict[str, Any] = {
        "skill": skill,
        "object": phrase,
        "image_url": encode_image(scene.image),
    }
    if settings:
        request["settings"] = settings
    truth = {
        "boxes": [
            dict(zip(("x_min", "y_min", "x_max", "y_max"), box, strict=True)) for box in boxes
        ]
    }
    return request, truth


@pytest.fixture
def client(tmp_path: Path):
    with httpx.Client(
        transport=InProcessTransport(create_app(data_dir=tmp_path)), base_url="http://t"
    ) as http:
        yield http


def create(client: httpx.Client, headers: dict = KEY, **body: Any) -> str:
    response = client.post(
        f"{URL}/adapters", json={"name": "a", "rank": 16, **body}, headers=headers
    )
    assert response.status_code == 200, response.text
    return response.json()["adapter_id"]


def sample(
    client: httpx.Client, adapter_id: str, request: dict, n: int = 4, truth: dict | None = None
) -> dict:
    body: dict[str, Any] = {"adapter_id": adapter_id, "num_rollouts": n, "request": request}
    if truth is not None:
        body["ground_truth"] = truth
    response = client.post(f"{URL}/rollouts", json=body, headers=KEY)
    assert response.status_code == 200, response.text
    return response.json()


def group(answer: dict, rewards: list[float] | None = None) -> dict:
    return {
        "request": answer["request"],
        "rollouts": answer["rollouts"],
        "rewards": rewards or answer["rewards"],
    }


def spread_rewards(count: int) -> list[float]:
    return [float(index % 2) for index in range(count)]


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    return body["error"]["message"]


def test_adapter_and_checkpoint_json_shapes(client: httpx.Client) -> None:
    adapter_id = create(client, name="vehicle-detector", rank=32)
    adapter = client.get(f"{URL}/adapters/{adapter_id}", headers=KEY).json()
    assert set(adapter) == {"adapter_id", "name", "rank", "created_at", "train_steps"}
    assert (adapter["name"], adapter["rank"], adapter["train_steps"]) == ("vehicle-detector", 32, 0)
    assert adapter["created_at"].endswith("Z")
    listing = client.get(f"{URL}/adapters", headers=KEY).json()
    assert listing == {"adapters": [adapter], "next_cursor": None}
    saved = client.post(f"{URL}/adapters/{adapter_id}/checkpoint", headers=KEY).json()
    assert set(saved) == {"checkpoint_id", "created_at"}
    assert saved["checkpoint_id"] == f"{adapter_id}/chk_001"
    listing = client.get(f"{URL}/adapters/{adapter_id}/checkpoints", headers=KEY).json()
    assert listing == {"checkpoints": [saved], "next_cursor": None}
    assert client.delete(f"{URL}/adapters/{adapter_id}", headers=KEY).json() == {}
    error(client.get(f"{URL}/adapters/{adapter_id}", headers=KEY), 404)
    error(client.get(f"{URL}/adapters/{adapter_id}/checkpoints", headers=KEY), 404)


@pytest.mark.parametrize("form", ["short", "encoded", "raw"])
def test_delete_checkpoint_accepts_every_id_form(client: httpx.Client, form: str) -> None:
    adapter_id = create(client)
    checkpoint_id = client.post(f"{URL}/adapters/{adapter_id}/checkpoint", headers=KEY).json()[
        "checkpoint_id"
    ]
    short = checkpoint_id.split("/")[1]
    path = {"short": short, "encoded": f"{adapter_id}%2F{short}", "raw": f"{adapter_id}/{short}"}[
        form
    ]
    response = client.delete(f"{URL}/adapters/{adapter_id}/checkpoints/{path}", headers=KEY)
    assert response.status_code == 200 and response.json() == {}
    assert (
        client.get(f"{URL}/adapters/{adapter_id}/checkpoints", headers=KEY).json()["checkpoints"]
        == []
    )
    error(client.delete(f"{URL}/adapters/{adapter_id}/checkpoints/{path}", headers=KEY), 404)


def test_rollouts_and_train_step_json(client: httpx.Client) -> None:
    adapter_id = create(client)
    request, truth = scene_request()
    answer = sample(client, adapter_id, request, n=3, truth=truth)
    assert answer["request"] == request
    assert len(answer["rollouts"]) == 3 and len(answer["rewards"]) == 3
    for rollout in answer["rollouts"]:
        assert rollout["skill"] == "detect"
        for box in rollout["output"]["boxes"]:
            assert 0 <= box["x_min"] < box["x_max"] <= 1 and 0 <= box["y_min"] < box["y_max"] <= 1
        assert {"answer_tokens", "coords", "logprobs", "signature"} <= set(rollout)
    assert all(0.0 <= reward <= 1.0 for reward in answer["rewards"])
    assert sample(client, adapter_id, request, n=1)["rewards"] is None
    response = client.post(
        f"{URL}/train_step",
        json={"adapter_id": adapter_id, "groups": [group(answer, spread_rewards(3))]},
        headers=KEY,
    )
    assert response.status_code == 200 and response.json() == {}
    assert client.get(f"{URL}/adapters/{adapter_id}", headers=KEY).json()["train_steps"] == 1


def test_skills_and_settings_are_honoured(client: httpx.Client) -> None:
    adapter_id = create(client)
    request, _ = scene_request(1)
    greedy = sample(client, adapter_id, {**request, "settings": {"temperature": 0}}, n=4)[
        "rollouts"
    ]
    assert all(rollout == greedy[0] for rollout in greedy)
    one = sample(client, adapter_id, {**request, "settings": {"max_objects": 1}}, n=8)["rollouts"]
    assert all(len(rollout["output"]["boxes"]) <= 1 for rollout in one)
    short = sample(client, adapter_id, {**request, "settings": {"max_tokens": 3}}, n=8)["rollouts"]
    assert all(len(r["answer_tokens"]) <= 3 and r["output"]["boxes"] == [] for r in short)
    nucleus = sample(client, adapter_id, {**request, "settings": {"top_p": 0.01}}, n=4)["rollouts"]
    assert all(rollout["output"] == nucleus[0]["output"] for rollout in nucleus)
    point = {"skill": "point", "object": request["object"], "image_url": request["image_url"]}
    for rollout in sample(client, adapter_id, point)["rollouts"]:
        assert all(0 <= p["x"] <= 1 and 0 <= p["y"] <= 1 for p in rollout["output"]["points"])
    query = {
        "skill": "query",
        "question": "How many circles are there?",
        "image_url": request["image_url"],
    }
    for rollout in sample(client, adapter_id, query)["rollouts"]:
        assert isinstance(rollout["output"]["answer"], str) and rollout["output"]["answer"]
    textual = sample(client, adapter_id, {"skill": "query", "question": "Is it red?"})["rollouts"]
    assert len(textual) == 4


def png_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


INVALID_BODIES = [
    ({"request": {"skill": "detect", "image_url": "@"}}, 422, "request.object: Field required"),
    ({"num_rollouts": 0}, 422, "num_rollouts"),
    ({"num_rollouts": 17}, 422, "num_rollouts"),
    ({"num_rollouts": "4"}, 422, "num_rollouts"),
    ({"adapter_id": None}, 422, "adapter_id"),
    ({"request": {"skill": "segment", "object": "x"}}, 422, "request"),
    ({"request": {"skill": "point", "object": "x"}}, 422, "request.image_url: Field required"),
    (
        {"request": {"skill": "point", "object": "x", "image_url": "https://example.com/a.jpg"}},
        400,
        "image_url",
    ),
    (
        {"request": {"skill": "point", "object": "x", "image_url": "data:image/gif;base64,R0lG"}},
        400,
        "image_url",
    ),
    (
        {"request": {"skill": "point", "object": "x", "image_url": "data:image/png;base64,!!"}},
        400,
        "image_url",
    ),
    (
        {
            "request": {
                "skill": "point",
                "object": "x",
                "image_url": "@",
                "settings": {"max_objects": 2},
            }
        },
        422,
        "max_objects",
    ),
    (
        {
            "request": {
                "skill": "detect",
                "object": "x",
                "image_url": "@",
                "settings": {"temperature": -1},
            }
        },
        422,
        "temperature",
    ),
    (
        {"request": {"skill": "detect", "object": "x", "image_url": "@", "settings": {"top_p": 0}}},
        422,
        "top_p",
    ),
    (
        {
            "request": {
                "skill": "detect",
                "object": "x",
                "image_url": "@",
                "settings": {"max_tokens": 0},
            }
        },
        422,
        "max_tokens",
    ),
    (
        {"request": {"skill": "query", "question": "q?"}, "ground_truth": {"boxes": []}},
        422,
        "ground_truth",
    ),
    (
        {"ground_truth": {"boxes": [{"x_min": 0.5, "y_min": 0, "x_max": 0.4, "y_max": 1}]}},
        422,
        "ground_truth.boxes.0",
    ),
    (
        {"ground_truth": {"boxes": [{"x_min": 0, "y_min": 0, "x_max": 1.5, "y_max": 1}]}},
        422,
        "ground_truth.boxes.0.x_max",
    ),
    ({"ground_truth": {"points": [{"x": 0.5, "y": 0.5}]}}, 422, "ground_truth.points"),
    ({"surprise": 1}, 422, "surprise"),
]


@pytest.mark.parametrize(("change", "status", "field"), INVALID_BODIES)
def test_rollouts_validation_names_the_field(
    client: httpx.Client, change: dict, status: int, field: str
) -> None:
    adapter_id = create(client)
    request, truth = scene_request()
    body: dict[str, Any] = {
        "adapter_id": adapter_id,
        "num_rollouts": 2,
        "request": request,
        "ground_truth": truth,
    }
    body.update(copy.deepcopy(change))
    if isinstance(body["request"], dict) and body["request"].get("image_url") == "@":
        body["request"]["image_url"] = request["image_url"]
    assert field in error(client.post(f"{URL}/rollouts", json=body, headers=KEY), status)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "a", "rank": 8}, "rank"),
        ({"name": "a", "rank": True}, "rank"),
        ({"name": "a"}, "rank: Field required"),
        ({"rank": 16}, "name: Field required"),
        ({"name": "", "rank": 16}, "name"),
        ({"name": "a", "rank": 16, "from_checkpoint": 3}, "from_checkpoint"),
    ],
)
def test_create_adapter_validation(client: httpx.Client, body: dict, field: str) -> None:
    assert field in error(client.post(f"{URL}/adapters", json=body, headers=KEY), 422)


def test_malformed_bodies(client: httpx.Client) -> None:
    error(client.post(f"{URL}/adapters", content=b"{nope", headers=KEY), 400)
    error(client.post(f"{URL}/adapters", json=[1], headers=KEY), 400)
    error(client.post(f"{URL}/rollouts", json={}, headers=KEY), 422)


def test_oversized_body_and_decompression_bomb(tmp_path: Path) -> None:
    app = create_app(data_dir=tmp_path, max_body_bytes=50_000, max_pixels=10_000)
    with httpx.Client(transport=InProcessTransport(app), base_url="http://t") as client:
        adapter_id = create(client)
        big = {
            "skill": "point",
            "object": "x",
            "image_url": "data:image/png;base64," + "A" * 60_000,
        }
        body = {"adapter_id": adapter_id, "num_rollouts": 1, "request": big}
        error(client.post(f"{URL}/rollouts", json=body, headers=KEY), 413)
        bomb = {"skill": "point", "object": "x", "image_url": png_url(200, 200)}
        body = {"adapter_id": adapter_id, "num_rollouts": 1, "request": bomb}
        assert "exceeds the limit" in error(
            client.post(f"{URL}/rollouts", json=body, headers=KEY), 400
        )


def test_authentication(tmp_path: Path, client: httpx.Client) -> None:
    error(client.get(f"{URL}/adapters"), 401)
    error(client.get(f"{URL}/adapters", headers={"X-Moondream-Auth": "  "}), 401)
    app = create_app(data_dir=tmp_path / "keyed", api_keys={"secret-1"})
    with httpx.Client(transport=InProcessTransport(app), base_url="http://t") as keyed:
        message = error(keyed.get(f"{URL}/adapters", headers={"X-Moondream-Auth": "wrong"}), 401)
        assert "wrong" not in message
        assert (
            keyed.get(f"{URL}/adapters", headers={"X-Moondream-Auth": "secret-1"}).status_code
            == 200
        )
    with pytest.raises(ValueError, match="api_keys"):
        create_app(data_dir=tmp_path / "empty", api_keys=[])


def test_keys_are_isolated(client: httpx.Client) -> None:
    adapter_id = create(client)
    checkpoint_id = client.post(f"{URL}/adapters/{adapter_id}/checkpoint", headers=KEY).json()[
        "checkpoint_id"
    ]
    request, truth = scene_request()
    answer = sample(client, adapter_id, request, n=2, truth=truth)
    assert client.get(f"{URL}/adapters", headers=OTHER).json() == {
        "adapters": [],
        "next_cursor": None,
    }
    error(client.get(f"{URL}/adapters/{adapter_id}", headers=OTHER), 404)
    error(client.get(f"{URL}/adapters/{adapter_id}/checkpoints", headers=OTHER), 404)
    error(client.post(f"{URL}/adapters/{adapter_id}/checkpoint", headers=OTHER), 404)
    error(client.delete(f"{URL}/adapters/{adapter_id}/checkpoints/chk_001", headers=OTHER), 404)
    error(
        client.post(
            f"{URL}/adapters",
            json={"name": "b", "rank": 16, "from_checkpoint": checkpoint_id},
            headers=OTHER,
        ),
        404,
    )
    body = {"adapter_id": adapter_id, "num_rollouts": 1, "request": request}
    error(client.post(f"{URL}/rollouts", json=body, headers=OTHER), 404)
    body = {"adapter_id": adapter_id, "groups": [group(answer, [0.0, 1.0])]}
    error(client.post(f"{URL}/train_step", json=body, headers=OTHER), 404)
    error(client.delete(f"{URL}/adapters/{adapter_id}", headers=OTHER), 404)
    assert client.get(f"{URL}/adapters/{adapter_id}", headers=KEY).status_code == 200


@pytest.mark.parametrize("bad", ["../../etc", "..%2F..%2Fx", "ABCDEF0123456789", "0" * 15])
def test_malformed_ids_are_unknown(client: httpx.Client, bad: str) -> None:
    error(client.get(f"{URL}/adapters/{bad}", headers=KEY), 404)
    error(client.post(f"{URL}/adapters/{bad}/checkpoint", headers=KEY), 404)


def test_pagination(client: httpx.Client) -> None:
    created = [create(client, name=f"n{index}") for index in range(5)]
    create(client, headers=OTHER)
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"{URL}/adapters", params=params, headers=KEY).json()
        seen += [adapter["adapter_id"] for adapter in page["adapters"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == created and pages == 3
    for limit in ("0", "101", "x"):
        assert "limit" in error(
            client.get(f"{URL}/adapters", params={"limit": limit}, headers=KEY), 422
        )
    assert "cursor" in error(
        client.get(f"{URL}/adapters", params={"cursor": "%%%"}, headers=KEY), 400
    )
    first = client.get(f"{URL}/adapters", params={"limit": 1}, headers=KEY).json()["next_cursor"]
    foreign_page = client.get(f"{URL}/adapters", params={"cursor": first}, headers=OTHER).json()
    assert not {adapter["adapter_id"] for adapter in foreign_page["adapters"]} & set(created)
    for _ in range(3):
        client.post(f"{URL}/adapters/{created[0]}/checkpoint", headers=KEY)
    page = client.get(
        f"{URL}/adapters/{created[0]}/checkpoints", params={"limit": 2}, headers=KEY
    ).json()
    rest = client.get(
        f"{URL}/adapters/{created[0]}/checkpoints",
        params={"cursor": page["next_cursor"]},
        headers=KEY,
    ).json()
    ids = [c["checkpoint_id"].split("/")[1] for c in page["checkpoints"] + rest["checkpoints"]]
    assert ids == ["chk_001", "chk_002", "chk_003"] and rest["next_cursor"] is None


def greedy_outputs(client: httpx.Client, adapter_id: str) -> list[Any]:
    outputs = []
    for index in range(4):
        request, _ = scene_request(index, temperature=0)
        rollout = sample(client, adapter_id, request, n=1)["rollouts"][0]
        outputs.append((rollout["output"], rollout["logprobs"]))
    return outputs


def train(client: httpx.Client, adapter_id: str, steps: int = 2) -> None:
    for step in range(steps):
        request, truth = scene_request(step, temperature=1.0)
        answer = sample(client, adapter_id, request, n=6, truth=truth)
        body = {"adapter_id": adapter_id, "groups": [group(answer, spread_rewards(6))]}
        assert client.post(f"{URL}/train_step", json=body, headers=KEY).status_code == 200


def test_train_step_changes_only_its_adapter(client: httpx.Client) -> None:
    trained, untouched = create(client), create(client)
    before_trained, before_untouched = (
        greedy_outputs(client, trained),
        greedy_outputs(client, untouched),
    )
    train(client, trained)
    assert greedy_outputs(client, trained) != before_trained
    assert greedy_outputs(client, untouched) == before_untouched


def test_checkpoint_restores_identical_greedy_outputs(client: httpx.Client) -> None:
    adapter_id = create(client)
    train(client, adapter_id)
    checkpoint_id = client.post(f"{URL}/adapters/{adapter_id}/checkpoint", headers=KEY).json()[
        "checkpoint_id"
    ]
    expected = greedy_outputs(client, adapter_id)
    train(client, adapter_id, steps=1)
    restored = create(client, from_checkpoint=checkpoint_id)
    assert greedy_outputs(client, restored) == expected
    assert client.get(f"{URL}/adapters/{restored}", headers=KEY).json()["train_steps"] == 0
    error(
        client.post(
            f"{URL}/adapters",
            json={"name": "x", "rank": 16, "from_checkpoint": f"{adapter_id}/chk_009"},
            headers=KEY,
        ),
        404,
    )
    error(
        client.post(
            f"{URL}/adapters",
            json={"name": "x", "rank": 16, "from_checkpoint": "nonsense"},
            headers=KEY,
        ),
        404,
    )
    assert "rank" in error(
        client.post(
            f"{URL}/adapters",
            json={"name": "x", "rank": 32, "from_checkpoint": checkpoint_id},
            headers=KEY,
        ),
        422,
    )


def test_state_survives_restart(tmp_path: Path) -> None:
    with httpx.Client(
        transport=InProcessTransport(create_app(data_dir=tmp_path)), base_url="http://t"
    ) as client:
        adapter_id = create(client)
        train(client, adapter_id)
        checkpoint_id = client.post(f"{URL}/adapters/{adapter_id}/checkpoint", headers=KEY).json()[
            "checkpoint_id"
        ]
        request, truth = scene_request(0, temperature=1.0)
        pending = sample(client, adapter_id, request, n=4, truth=truth)
        expected = greedy_outputs(client, adapter_id)
    with httpx.Client(
        transport=InProcessTransport(create_app(data_dir=tmp_path)), base_url="http://t"
    ) as client:
        assert client.get(f"{URL}/adapters/{adapter_id}", headers=KEY).json()["train_steps"] == 2
        assert greedy_outputs(client, adapter_id) == expected
        listed = client.get(f"{URL}/adapters/{adapter_id}/checkpoints", headers=KEY).json()[
            "checkpoints"
        ]
        assert [c["checkpoint_id"] for c in listed] == [checkpoint_id]
        # Rollouts signed before the restart are still accepted after it.
        body = {"adapter_id": adapter_id, "groups": [group(pending, spread_rewards(4))]}
        assert client.post(f"{URL}/train_step", json=body, headers=KEY).status_code == 200


def tamper_tokens(rollout: dict) -> None:
    rollout["answer_tokens"][0] = (rollout["answer_tokens"][0] + 1) % 32


def tamper_logprobs(rollout: dict) -> None:
    rollout["logprobs"][0] -= 1.0


def drop_signature(rollout: dict) -> None:
    del rollout["signature"]


@pytest.mark.parametrize(
    ("tamper", "status"), [(tamper_tokens, 400), (tamper_logprobs, 400), (drop_signature, 422)]
)
def test_tampered_rollouts_are_rejected(client: httpx.Client, tamper: Any, status: int) -> None:
    adapter_id = create(client)
    request, truth = scene_request()
    answer = sample(client, adapter_id, request, n=3, truth=truth)
    tamper(answer["rollouts"][1])
    body = {"adapter_id": adapter_id, "groups": [group(answer, spread_rewards(3))]}
    assert "groups[0].rollouts[1]" in error(
        client.post(f"{URL}/train_step", json=body, headers=KEY), status
    )
    assert client.get(f"{URL}/adapters/{adapter_id}", headers=KEY).json()["train_steps"] == 0


def test_foreign_or_mismatched_rollouts_are_rejected(client: httpx.Client) -> None:
    first, second = create(client), create(client)
    request, truth = scene_request()
    answer = sample(client, first, request, n=2, truth=truth)
    body = {"adapter_id": second, "groups": [group(answer, [0.0, 1.0])]}
    assert "groups[0].rollouts[0]" in error(
        client.post(f"{URL}/train_step", json=body, headers=KEY), 400
    )
    other_request, _ = scene_request(3)
    moved = {"request": other_request, "rollouts": answer["rollouts"], "rewards": [0.0, 1.0]}
    body = {"adapter_id": first, "groups": [moved]}
    assert "groups[0].rollouts[0]" in error(
        client.post(f"{URL}/train_step", json=body, headers=KEY), 400
    )


@pytest.mark.parametrize(
    ("groups", "field"),
    [
        ([], "groups"),
        ([{"request": {"skill": "detect"}, "rollouts": [], "rewards": []}], "groups[0].rollouts"),
        ("REWARDS_SHORT", "groups[0]"),
        ("REWARDS_NAN", "rewards[0]"),
    ],
)
def test_train_step_validation(client: httpx.Client, groups: Any, field: str) -> None:
    adapter_id = create(client)
    if isinstance(groups, str):
        request, truth = scene_request()
        answer = sample(client, adapter_id, request, n=2, truth=truth)
        rewards = [1.0] if groups == "REWARDS_SHORT" else [float("nan"), 1.0]
        groups = [
            {"request": answer["request"], "rollouts": answer["rollouts"], "rewards": rewards}
        ]
    # json.dumps writes NaN as a bare token, as a careless client would.
    content = json.dumps({"adapter_id": adapter_id, "groups": groups})
    response = client.post(
        f"{URL}/train_step", content=content, headers={**KEY, "content-type": "application/json"}
    )
    assert field in error(response, 422)


def test_train_step_takes_an_optional_lr_beyond_the_spec(client: httpx.Client) -> None:
    adapter_id = create(client)
    request, truth = scene_request()
    answer = sample(client, adapter_id, request, n=3, truth=truth)
    body = {"adapter_id": adapter_id, "groups": [group(answer, spread_rewards(3))]}
    refused = client.post(f"{URL}/train_step", json={**body, "lr": -1.0}, headers=KEY)
    assert error(refused, 422).startswith("lr:")
    before = greedy_outputs(client, adapter_id)
    for lr, steps in ((0, 0), (1e-2, 1)):
        response = client.post(f"{URL}/train_step", json={**body, "lr": lr}, headers=KEY)
        assert response.status_code == 200 and response.json() == {}
        adapter = client.get(f"{URL}/adapters/{adapter_id}", headers=KEY).json()
        assert adapter["train_steps"] == steps
        # At lr 0 the step is computed but changes nothing.
        assert (greedy_outputs(client, adapter_id) == before) == (lr == 0)


def test_rollouts_during_train_steps_see_whole_states(tmp_path: Path) -> None:
    app = create_app(data_dir=tmp_path)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=KEY) as http:
            adapter_id = (
                await http.post(f"{URL}/adapters", json={"name": "c", "rank": 16})
            ).json()["adapter_id"]
            request, truth = scene_request(0, temperature=1.0)
            body = {
                "adapter_id": adapter_id,
                "num_rollouts": 8,
                "request": request,
                "ground_truth": truth,
            }
            answer = (await http.post(f"{URL}/rollouts", json=body)).json()
            steps = [
                http.post(
                    f"{URL}/train_step",
                    json={"adapter_id": adapter_id, "groups": [group(answer, spread_rewards(8))]},
                )
                for _ in range(3)
            ]
            reads = [http.post(f"{URL}/rollouts", json=body) for _ in range(6)]
            responses = await asyncio.gather(*steps, *reads)
            assert [response.status_code for response in responses] == [200] * 9
            for response in responses[3:]:
                assert len(response.json()["rollouts"]) == 8
            adapter = (await http.get(f"{URL}/adapters/{adapter_id}")).json()
            assert adapter["train_steps"] == 3

    asyncio.run(scenario())


def test_sampling_seeds_do_not_depend_on_arrival_order(tmp_path: Path) -> None:
    requests = [scene_request(index, temperature=1.0)[0] for index in range(3)]

    async def answers(data_dir: Path, order: list[int]) -> list[list[list[int]]]:
        transport = httpx.ASGITransport(app=create_app(data_dir=data_dir, seed=5))
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=KEY) as http:
            adapter_id = (
                await http.post(f"{URL}/adapters", json={"name": "s", "rank": 16})
            ).json()["adapter_id"]
            responses = await asyncio.gather(
                *(
                    http.post(
                        f"{URL}/rollouts",
                        json={"adapter_id": adapter_id, "num_rollouts": 8, "request": requests[i]},
                    )
                    for i in order
                )
            )
        by_request: list[list[list[int]]] = [[] for _ in requests]
        for index, response in zip(order, responses, strict=True):
            assert response.status_code == 200, response.text
            tokens = [rollout["answer_tokens"] for rollout in response.json()["rollouts"]]
            by_request[index].append(tokens)
        return by_request

    forward = asyncio.run(answers(tmp_path / "forward", [0, 1, 2, 0]))
    backward = asyncio.run(answers(tmp_path / "backward", [0, 2, 1, 0]))
    assert [sorted(draws) for draws in forward] == [sorted(draws) for draws in backward]
    # Asking again for the same request draws new samples.
    assert forward[0][0] != forward[0][1]


def statuses(app: Any, count: int) -> list[int | str]:
    results: list[int | str] = []
    with httpx.Client(transport=InProcessTransport(app), base_url="http://t") as client:
        for _ in range(count):
            try:
                results.append(client.get(f"{URL}/adapters", headers=KEY).status_code)
            except httpx.RemoteProtocolError:
                results.append("drop")
    return results


def test_injected_faults_are_seeded_and_stateless(tmp_path: Path) -> None:
    config = FaultConfig(rate=0.5, seed=7)
    first = statuses(create_app(data_dir=tmp_path / "a", faults=config), 40)
    second = statuses(create_app(data_dir=tmp_path / "b", faults=config), 40)
    assert first == second
    assert {200, 429, 503, 500, "drop"} == set(first)
    app = create_app(
        data_dir=tmp_path / "c",
        faults=FaultConfig(rate=1.0, kinds=("429",), retry_after=3, endpoints=("adapters",)),
    )
    with httpx.Client(transport=InProcessTransport(app), base_url="http://t") as client:
        response = client.post(f"{URL}/adapters", json={"name": "a", "rank": 16}, headers=KEY)
        assert error(response, 429) and response.headers["Retry-After"] == "3"
    assert app.state.service.store.list_adapters(app.state.service._owner("key-a"), 10, 0)[0] == []


@pytest.mark.parametrize("mode", ["500", "drop"])
def test_failure_after_applied_train_step(tmp_path: Path, mode: str) -> None:
    app = create_app(data_dir=tmp_path, faults=FaultConfig(after_train_step=mode))
    with httpx.Client(transport=InProcessTransport(app), base_url="http://t") as client:
        adapter_id = create(client)
        request, truth = scene_request()
        answer = sample(client, adapter_id, request, n=2, truth=truth)
        body = {"adapter_id": adapter_id, "groups": [group(answer, [0.0, 1.0])]}
        if mode == "500":
            error(client.post(f"{URL}/train_step", json=body, headers=KEY), 500)
        else:
            with pytest.raises(httpx.RemoteProtocolError, match="dropped the connection"):
                client.post(f"{URL}/train_step", json=body, headers=KEY)
        assert client.get(f"{URL}/adapters/{adapter_id}", headers=KEY).json()["train_steps"] == 1


def test_invalid_service_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="policy"):
        create_app(data_dir=tmp_path, policy="huge")
    with pytest.raises(ValueError, match="latency"):
        create_app(data_dir=tmp_path, latency={"everything": 1.0})
    with pytest.raises(ValueError, match="rates"):
        FaultConfig(rate=2.0)
    with pytest.raises(ValueError, match="after_train_step"):
        FaultConfig(after_train_step="429")


def test_latency_is_the_least_time_to_answer(tmp_path: Path) -> None:
    app = create_app(
        data_dir=tmp_path,
        policy="constant",
        latency={"rollouts": 0.3, "adapters": 0.2},
        faults=FaultConfig(rate=1.0, kinds=("503",), endpoints=("adapters",)),
    )
    with httpx.Client(transport=InProcessTransport(app), base_url="http://t") as client:
        started = time.monotonic()
        refused = client.post(f"{URL}/adapters", json={"name": "a", "rank": 16}, headers=KEY)
        assert refused.status_code == 503 and time.monotonic() - started >= 0.2
    app = create_app(data_dir=tmp_path, policy="constant", latency={"rollouts": 0.3})
    with httpx.Client(transport=InProcessTransport(app), base_url="http://t") as client:
        adapter_id = create(client)
        started = time.monotonic()
        sample(client, adapter_id, scene_request()[0], n=2)
        assert time.monotonic() - started >= 0.3


def test_latency_holds_the_answer_of_work_already_done(tmp_path: Path) -> None:
    # A remote service's latency includes its own work: the step is applied on arrival
    # and only its answer waits.
    app = create_app(data_dir=tmp_path, policy="constant", latency={"train_step": 3600.0})

    async def scenario() -> None:
        transport = InProcessAsyncTransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            created = await client.post(
                f"{URL}/adapters", json={"name": "a", "rank": 16}, headers=KEY
            )
            adapter_id = created.json()["adapter_id"]
            body = {"adapter_id": adapter_id, "num_rollouts": 2, "request": scene_request()[0]}
            answer = (await client.post(f"{URL}/rollouts", json=body, headers=KEY)).json()
            step_body = {"adapter_id": adapter_id, "groups": [group(answer, [0.0, 1.0])]}
            step = asyncio.ensure_future(
                client.post(f"{URL}/train_step", json=step_body, headers=KEY)
            )
            adapter_url = f"{URL}/adapters/{adapter_id}"
            give_up = time.monotonic() + 60
            while (await client.get(adapter_url, headers=KEY)).json()["train_steps"] == 0:
                assert time.monotonic() < give_up, "the train step was not applied on arrival"
                await asyncio.sleep(0.01)
            assert not step.done()
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await step

    asyncio.run(scenario())


def test_constant_policy_answers_and_counts_steps(tmp_path: Path) -> None:
    app = create_app(data_dir=tmp_path, policy="constant", latency={"rollouts": 0.0})
    with httpx.Client(transport=InProcessTransport(app), base_url="http://t") as client:
        adapter_id = create(client)
        request, truth = scene_request()
        answer = sample(client, adapter_id, request, n=4, truth=truth)
        assert all(r["output"] == answer["rollouts"][0]["output"] for r in answer["rollouts"])
        assert len(answer["rollouts"][0]["output"]["boxes"]) == 1
        body = {"adapter_id": adapter_id, "groups": [group(answer, spread_rewards(4))]}
        assert client.post(f"{URL}/train_step", json=body, headers=KEY).status_code == 200
        assert client.get(f"{URL}/adapters/{adapter_id}", headers=KEY).json()["train_steps"] == 1
        query = {"skill": "query", "question": "Anything?"}
        assert sample(client, adapter_id, query, n=1)["rollouts"][0]["output"] == {"answer": "yes"}


def test_an_image_broken_after_its_header_is_refused(client: httpx.Client) -> None:
    adapter_id = create(client)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="PNG")
    truncated = base64.b64encode(buffer.getvalue()[:-40]).decode()
    request = {"skill": "point", "object": "x", "image_url": f"data:image/png;base64,{truncated}"}
    body = {"adapter_id": adapter_id, "num_rollouts": 1, "request": request}
    assert "request.image_url" in error(client.post(f"{URL}/rollouts", json=body, headers=KEY), 400)


def test_a_local_service_is_released_once_with_its_client() -> None:
    app = create_app()
    folder = Path(app.state.temporary_dir.name)
    released: list[str] = []

    def release() -> None:
        released.append("app")
        close_app(app)

    with httpx.Client(
        transport=InProcessTransport(app, on_close=release), base_url="http://t"
    ) as client:
        assert client.get(f"{URL}/adapters", headers=KEY).status_code == 200
        assert folder.exists()
    assert released == ["app"]
    assert not folder.exists()


def test_an_app_that_ends_without_answering_is_a_dropped_connection() -> None:
    async def silent_app(scope: Any, receive: Any, send: Any) -> None:
        await receive()

    async def scenario() -> None:
        transport = InProcessAsyncTransport(silent_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            with pytest.raises(httpx.RemoteProtocolError, match="dropped the connection"):
                await client.post(f"{URL}/rollouts", json={})

    asyncio.run(scenario())
