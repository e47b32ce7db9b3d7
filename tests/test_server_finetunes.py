"""The ``/finetunes`` dialect of the local service, driven by Moondream's own SDK."""

from __future__ import annotations

import asyncio
import json
import math
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import moondream  # a missing SDK must fail these tests, not skip them
import pytest
from moondream.finetune import Finetune
from support import serving

from lightning_moondream.data import synthetic
from lightning_moondream.images import encode_image
from lightning_moondream.server import create_app
from lightning_moondream.server.codec import REASONING_VOCAB
from lightning_moondream.server.serve import build_parser

KEY = "finetunes-test-key"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    app = create_app(
        data_dir=tmp_path_factory.mktemp("finetunes"), checkpoint_retention=3600, seed=3
    )
    with serving(app) as url:
        yield url


def _scene(index: int) -> tuple[Any, str, list[tuple[float, float, float, float]]]:
    scene = synthetic.make_scene(synthetic.split_seed("test", index))
    phrase, boxes = synthetic.detect_tasks(scene)[0]
    return scene.image, phrase, boxes


def test_sdk_drives_a_whole_finetune(base_url: str) -> None:
    image, phrase, boxes = _scene(0)
    truth = {
        "boxes": [dict(zip(("x_min", "y_min", "x_max", "y_max"), b, strict=True)) for b in boxes]
    }
    ft = moondream.ft(KEY, name="sdk-run", rank=16, endpoint=base_url)
    again = moondream.ft(KEY, finetune_id=ft.finetune_id, endpoint=base_url)
    assert (again.finetune_id, again.name, again.rank) == (ft.finetune_id, "sdk-run", 16)

    query = ft.rollouts(
        "query",
        image=image,
        question="what color is the shape?",
        num_rollouts=3,
        reasoning=True,
        spatial_refs=[[0.2, 0.3], [0.1, 0.1, 0.5, 0.6]],
    )
    for rollout in query["rollouts"]:
        reasoning = rollout["output"]["reasoning"]
        words = reasoning["text"].lower().replace(",", "").replace(".", "").split()
        assert [REASONING_VOCAB[token] for token in rollout["thinking_tokens"]] == words
        assert (
            words[-len(rollout["output"]["answer"].split()) :]
            == rollout["output"]["answer"].split()
        )
        (grounding,) = reasoning["grounding"]
        assert (
            reasoning["text"][grounding["start_idx"] : grounding["end_idx"]] == "the marked region"
        )
        assert grounding["points"] == [[0.2, 0.3], [0.3, 0.35]]
        assert rollout["has_answer_separator"] is True
        assert rollout["finish_reason"] in ("stop", "length")
    point = ft.rollouts(
        "point", image=image, object=phrase, num_rollouts=2, spatial_refs=[[0.5, 0.5]]
    )
    assert all("points" in rollout["output"] for rollout in point["rollouts"])
    assert all(rollout["thinking_tokens"] == [] for rollout in point["rollouts"])
    detect = ft.rollouts("detect", image=image, object=phrase, num_rollouts=4, ground_truth=truth)
    assert len(detect["rewards"]) == 4
    for rollout in detect["rollouts"]:
        objects = rollout["output"]["objects"]
        assert "boxes" not in rollout["output"]
        assert rollout["sizes"] == [
            pytest.approx([box["x_max"] - box["x_min"], box["y_max"] - box["y_min"]])
            for box in objects
        ]

    requests = [
        (
            index,
            {
                "skill": "detect",
                "image": _scene(index)[0],
                "object": _scene(index)[1],
                "num_rollouts": 4,
            },
        )
        for index in range(5)
    ]
    streamed = dict(ft.rollout_stream(requests, max_concurrency=3))
    assert sorted(streamed) == list(range(5))

    rl = {
        "mode": "rl",
        "request": detect["request"],
        "rollouts": detect["rollouts"],
        "rewards": [0.0, 1.0, 0.5, 0.25],
    }
    sft = {
        "mode": "sft",
        "request": {"skill": "detect", "image": image, "object": phrase},
        "target": truth,
    }
    first = ft.train_step([rl, sft], lr=1e-3)
    assert first["step"] == 1 and first["applied"] is True
    assert first["kl"] > 0 and first["grad_norm"] > 0 and first["sft_loss"] > 0
    assert first["router_kl"] is None
    assert first["reward_mean"] == pytest.approx(0.4375)
    assert first["reward_std"] == pytest.approx(math.sqrt(0.546875 / 4))
    second = ft.train_step([sft], lr=1e-3)
    assert second["step"] == 2 and second["reward_mean"] is None
    assert second["sft_loss"] < first["sft_loss"]

    assert ft.log_metrics(2, {"reward": 0.5, "loss": 1.25}) == {
        "ok": True,
        "step": 2,
        "logged_count": 2,
    }
    metrics = httpx.get(
        f"{base_url}/finetunes/{ft.finetune_id}/metrics", headers={"X-Moondream-Auth": KEY}
    ).json()
    assert [(m["step"], m["name"], m["value"]) for m in metrics["metrics"]] == [
        (2, "loss", 1.25),
        (2, "reward", 0.5),
    ]

    saved = ft.save_checkpoint()
    assert saved["ok"] is True and saved["checkpoint"]["step"] == 2
    checkpoint = saved["checkpoint"]
    assert checkpoint["expires_at_ms"] == checkpoint["created_at_ms"] + 3_600_000
    listed = ft.list_checkpoints()
    assert [c["step"] for c in listed["checkpoints"]] == [2] and listed["has_more"] is False
    ft.delete_checkpoint(2)
    assert ft.list_checkpoints()["checkpoints"] == []
    assert ft.model(2) == f"moondream3-preview/{ft.finetune_id}@2"

    ft.delete()
    with pytest.raises(Exception, match="404"):
        moondream.ft(KEY, finetune_id=ft.finetune_id, endpoint=base_url)


def test_same_adapter_through_both_dialects(base_url: str) -> None:
    image, phrase, _ = _scene(1)
    ft = moondream.ft(KEY, name="both", rank=32, endpoint=base_url)
    headers = {"X-Moondream-Auth": KEY}
    adapter = httpx.get(f"{base_url}/adapters/{ft.finetune_id}", headers=headers).json()
    assert adapter["name"] == "both" and adapter["train_steps"] == 0
    answer = ft.rollouts("detect", image=image, object=phrase, num_rollouts=4)
    # A rollout sampled through one dialect trains through the other.
    group = {"request": answer["request"], "rollouts": answer["rollouts"], "rewards": [1, 0, 0, 0]}
    step = httpx.post(
        f"{base_url}/train_step",
        headers=headers,
        json={"adapter_id": ft.finetune_id, "groups": [group]},
    )
    assert step.status_code == 200 and step.json() == {}
    finetune = httpx.get(f"{base_url}/finetunes/{ft.finetune_id}", headers=headers).json()
    assert finetune["finetune"]["train_steps"] == 1
    saved = httpx.post(f"{base_url}/adapters/{ft.finetune_id}/checkpoint", headers=headers).json()
    assert [c["checkpoint_id"] for c in ft.list_checkpoints()["checkpoints"]] == [
        saved["checkpoint_id"]
    ]


def test_dialects_can_be_served_alone(tmp_path: Path) -> None:
    headers = {"X-Moondream-Auth": KEY}
    only = create_app(data_dir=tmp_path, policy="constant", dialect="finetunes")
    transport = httpx.ASGITransport(app=only)

    async def calls() -> tuple[int, int]:
        async with httpx.AsyncClient(transport=transport, base_url="http://t/v1/tuning") as client:
            made = await client.post("/finetunes", json={"name": "x", "rank": 16}, headers=headers)
            adapters = await client.get("/adapters", headers=headers)
            return made.status_code, adapters.status_code

    assert asyncio.run(calls()) == (200, 404)
    with pytest.raises(ValueError, match="dialect"):
        create_app(data_dir=tmp_path, dialect="v2")


def _sft(split: str, index: int) -> dict[str, Any]:
    image, phrase, boxes = _scene(index) if split == "test" else _train_scene(index)
    target = {
        "boxes": [dict(zip(("x_min", "y_min", "x_max", "y_max"), b, strict=True)) for b in boxes]
    }
    return {
        "mode": "sft",
        "request": {"skill": "detect", "image": image, "object": phrase},
        "target": target,
    }


def _train_scene(index: int) -> tuple[Any, str, list[tuple[float, float, float, float]]]:
    scene = synthetic.make_scene(synthetic.split_seed("train", index))
    phrase, boxes = synthetic.detect_tasks(scene)[0]
    return scene.image, phrase, boxes


def test_sft_teaches_held_out_targets_and_lr_sets_the_size(base_url: str) -> None:
    ft = moondream.ft(KEY, name="sft", rank=16, endpoint=base_url)
    held_out = [_sft("test", index) for index in range(4)]
    measured = ft.train_step(held_out, lr=0)
    # lr 0 measures without changing anything: not applied, not counted, no movement.
    assert measured["applied"] is False and measured["step"] == 0 and measured["kl"] == 0.0
    assert ft.train_step(held_out, lr=0)["sft_loss"] == pytest.approx(measured["sft_loss"])
    train = [_sft("train", index) for index in range(8)]
    for _ in range(8):
        report = ft.train_step(train, lr=3e-3)
        assert report["applied"] is True and report["kl"] > 0
    after = ft.train_step(held_out, lr=0)
    assert after["step"] == 8
    assert after["sft_loss"] < measured["sft_loss"] - 1.0, (measured, after)

    small = moondream.ft(KEY, name="small", rank=16, endpoint=base_url).train_step(train, lr=1e-4)
    large = moondream.ft(KEY, name="large", rank=16, endpoint=base_url).train_step(train, lr=1e-2)
    assert large["kl"] > 10 * small["kl"] > 0
    assert large["grad_norm"] > 0 and small["grad_norm"] > 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda body: body["groups"][0].pop("target"), "groups[0].target"),
        (lambda body: body.update(lr=-0.1), "lr"),
        (lambda body: body.update(lr="fast"), "lr"),
        (lambda body: body["groups"][0].update(target={"answer": "red"}), "groups[0].target"),
        (lambda body: body["groups"][0].update(mode="dpo"), "groups[0].mode"),
        (
            lambda body: body["groups"][0]["request"].update(reasoning=True),
            "groups[0].request.reasoning",
        ),
        (
            lambda body: body["groups"][0]["request"].update(spatial_refs=[[0.5, 0.2, 0.1, 0.9]]),
            "groups[0].request.spatial_refs[0]",
        ),
    ],
)
def test_bad_train_steps_are_refused_naming_the_field(
    base_url: str, change: Any, field: str
) -> None:
    headers = {"X-Moondream-Auth": KEY}
    ft = moondream.ft(KEY, name="bad", rank=16, endpoint=base_url)
    image, phrase, _ = _scene(2)
    body: dict[str, Any] = {
        "finetune_id": ft.finetune_id,
        "lr": 1e-3,
        "groups": [
            {
                "mode": "sft",
                "request": {"skill": "detect", "object": phrase, "image_url": encode_image(image)},
                "target": {"boxes": [{"x_min": 0.1, "y_min": 0.1, "x_max": 0.4, "y_max": 0.5}]},
            }
        ],
    }
    change(body)
    response = httpx.post(f"{base_url}/train_step", json=body, headers=headers)
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith(field)
    assert ft_steps(base_url, ft.finetune_id) == 0


def ft_steps(base_url: str, finetune_id: str) -> int:
    answer = httpx.get(f"{base_url}/finetunes/{finetune_id}", headers={"X-Moondream-Auth": KEY})
    return int(answer.json()["finetune"]["train_steps"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"step": 1, "metrics": {"loss": float("nan")}}, "metrics.loss"),
        ({"step": -1, "metrics": {"loss": 1.0}}, "step"),
        ({"step": 1, "metrics": {" ": 1.0}}, "metrics"),
        ({"step": 1.5, "metrics": {"loss": 1.0}}, "step"),
    ],
)
def test_bad_metrics_are_refused_and_not_stored(
    base_url: str, body: dict[str, Any], field: str
) -> None:
    headers = {"X-Moondream-Auth": KEY}
    ft = moondream.ft(KEY, name="metrics", rank=16, endpoint=base_url)
    url = f"{base_url}/finetunes/{ft.finetune_id}/metrics"
    response = httpx.post(
        url, content=json.dumps(body), headers={**headers, "content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith(field)
    assert httpx.get(url, headers=headers).json() == {"metrics": []}
    with pytest.raises(Exception, match="422"):
        ft.log_metrics(1, {"loss": float("inf")})


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -1e-3])
def test_sdk_train_step_with_a_bad_lr_is_refused(base_url: str, lr: float) -> None:
    ft = moondream.ft(KEY, name="bad-lr", rank=16, endpoint=base_url)
    with pytest.raises(urllib.error.HTTPError) as raised:
        ft.train_step([_sft("test", 0)], lr=lr)
    assert raised.value.code == 422
    assert json.loads(raised.value.read())["error"]["message"].startswith("lr: ")
    assert ft_steps(base_url, ft.finetune_id) == 0


def sdk_refusal(call: Callable[[], object]) -> tuple[int, str]:
    """The status and error message of an SDK call the service refuses.

    The body is the API's ``{"error": {"type", "message"}}``; the statuses checked with
    this are ones the SDK does not retry, so a refusal costs one request.
    """
    with pytest.raises(urllib.error.HTTPError) as raised:
        call()
    body = json.loads(raised.value.read())
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    return raised.value.code, body["error"]["message"]


@pytest.mark.parametrize("whose", ["deleted", "other-key"])
def test_every_finetune_route_answers_404_for_an_unknown_finetune(
    base_url: str, whose: str
) -> None:
    ft = moondream.ft(KEY, name="unknown", rank=16, endpoint=base_url)
    finetune_id = ft.finetune_id
    image, phrase, _ = _scene(3)
    if whose == "deleted":
        ft.delete()
        # Deleting again succeeds as the first delete did; every other route is 404.
        ft.delete()
        key = KEY
    else:
        # Another key's finetune is as unknown as one that never existed.
        key = "another-finetunes-key"
        ft = Finetune(api_key=key, endpoint=base_url, finetune_id=finetune_id, name="", rank=0)
    calls: dict[str, Callable[[], object]] = {
        "get": lambda: moondream.ft(key, finetune_id=finetune_id, endpoint=base_url),
        "rollouts": lambda: ft.rollouts("detect", image=image, object=phrase, num_rollouts=2),
        "train_step": lambda: ft.train_step([_sft("test", 0)]),
        "log_metrics": lambda: ft.log_metrics(1, {"loss": 1.0}),
        "list_checkpoints": ft.list_checkpoints,
        "save_checkpoint": ft.save_checkpoint,
        "delete_checkpoint": lambda: ft.delete_checkpoint(1),
    }
    if whose == "other-key":
        calls["delete"] = ft.delete
    for route, call in calls.items():
        status, message = sdk_refusal(call)
        assert (route, status) == (route, 404)
        assert finetune_id in message, route
    if whose == "other-key":
        assert ft_steps(base_url, finetune_id) == 0


def test_a_missing_checkpoint_step_is_404_and_a_bad_one_422(base_url: str) -> None:
    ft = moondream.ft(KEY, name="steps", rank=16, endpoint=base_url)
    status, message = sdk_refusal(lambda: ft.delete_checkpoint(7))
    assert status == 404 and message == f"no checkpoint of finetune {ft.finetune_id!r} at step 7"
    status, message = sdk_refusal(lambda: ft.delete_checkpoint(-1))
    assert status == 422 and message.startswith("step: ")


@pytest.mark.parametrize(
    ("name", "rank", "field"),
    [("x", 12, "rank: "), ("x", "16", "rank: "), ("", 16, "name: ")],
    ids=["rank-12", "rank-string", "empty-name"],
)
def test_a_bad_finetune_is_refused_naming_the_field(
    base_url: str, name: str, rank: Any, field: str
) -> None:
    status, message = sdk_refusal(
        lambda: moondream.ft(KEY, name=name, rank=rank, endpoint=base_url)
    )
    assert status == 422 and message.startswith(field)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"num_rollouts": 0}, "num_rollouts: "),
        ({"num_rollouts": 17}, "num_rollouts: "),
        ({"object": None}, "request.object: "),
        ({"image": None}, "request.image_url: "),
        ({"settings": {"temperature": -1}}, "request.settings.temperature: "),
        (
            {"ground_truth": {"boxes": [{"x_min": 0.5, "y_min": 0, "x_max": 0.1, "y_max": 1}]}},
            "ground_truth.boxes.0: ",
        ),
    ],
    ids=["no-rollouts", "too-many-rollouts", "no-object", "no-image", "temperature", "box"],
)
def test_bad_rollouts_are_refused_naming_the_field(
    base_url: str, options: dict[str, Any], field: str
) -> None:
    ft = moondream.ft(KEY, name="bad-rollouts", rank=16, endpoint=base_url)
    image, phrase, _ = _scene(4)
    arguments: dict[str, Any] = {"image": image, "object": phrase, "num_rollouts": 2, **options}
    status, message = sdk_refusal(lambda: ft.rollouts("detect", **arguments))
    assert status == 422 and message.startswith(field)


def test_an_unreadable_body_or_cursor_is_400(base_url: str) -> None:
    headers = {"X-Moondream-Auth": KEY, "content-type": "application/json"}
    answer = httpx.post(f"{base_url}/finetunes", content=b"{nope", headers=headers)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"].startswith("body: ")
    ft = moondream.ft(KEY, name="cursor", rank=16, endpoint=base_url)
    status, message = sdk_refusal(lambda: ft.list_checkpoints(cursor="not-a-cursor"))
    assert status == 400 and message.startswith("cursor: ")


def test_serve_takes_dialect_and_checkpoint_retention() -> None:
    args = build_parser().parse_args(["--dialect", "finetunes", "--checkpoint-retention", "60"])
    assert (args.dialect, args.checkpoint_retention) == ("finetunes", 60.0)
    assert build_parser().parse_args([]).dialect == "both"
