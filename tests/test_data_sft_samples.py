"""Samples build SFT groups and carry reasoning and spatial references."""

from __future__ import annotations

import httpx
import pytest

from lightning_moondream.api import Box, Point, TuningClient
from lightning_moondream.data.samples import DetectSample, PointSample, QuerySample

DATA_URL = "data:image/jpeg;base64,/9j/AAAA"
BOX = Box(x_min=0.1, y_min=0.2, x_max=0.4, y_max=0.6)


def test_each_skill_builds_its_sft_group_from_its_ground_truth() -> None:
    query = QuerySample(
        image=None,
        question="what is it?",
        answers=("a cat", "cat"),
        reasoning=True,
        reasoning_text="it has whiskers",
        spatial_refs=((0.5, 0.5),),
    )
    assert query.sft_group() == {
        "mode": "sft",
        "request": {
            "skill": "query",
            "question": "what is it?",
            "reasoning": True,
            "spatial_refs": [[0.5, 0.5]],
        },
        "target": {"answer": "a cat", "reasoning": "it has whiskers"},
    }
    detect = DetectSample(image=DATA_URL, object="cat", boxes=(BOX,), image_size=(4, 4))
    assert detect.sft_group()["target"] == {"boxes": [BOX.model_dump()]}
    point = PointSample(
        image=DATA_URL, object="cat", points=(Point(x=0.2, y=0.3),), image_size=(4, 4)
    )
    assert point.sft_group()["target"] == {"points": [{"x": 0.2, "y": 0.3}]}
    assert (
        "reasoning"
        not in QuerySample(image=None, question="q", answers=("a",)).to_request().to_json()
    )


def test_a_query_without_answers_cannot_teach() -> None:
    with pytest.raises(ValueError, match="query sample 'q7' has no answer"):
        QuerySample(image=None, question="q", answers=(), id="q7").sft_group()


def test_sample_groups_train_on_the_finetunes_wire_only() -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"step": 1, "applied": True, "sft_loss": 0.7})

    client = TuningClient(
        api_key="sft-test-key",
        base_url="https://tuning.example/v1/tuning",
        http_client=httpx.Client(transport=httpx.MockTransport(answer)),
        dialect="finetunes",
    )
    group = QuerySample(image=None, question="q", answers=("a",)).sft_group()
    assert client.train_step("ft_1", [group]).sft_loss == 0.7
    assert len(sent) == 1
    with pytest.raises(ValueError, match=r"spatial_refs\n.*within 0 to 1"):
        QuerySample(
            image=None, question="q", answers=("a",), spatial_refs=((0.5, 2.0),)
        ).to_request()
