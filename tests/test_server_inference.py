"""The local service's inference API, driven by Moondream's own SDK (``md.vl``) and ours."""

from __future__ import annotations

import asyncio
import json
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import moondream  # a missing SDK must fail these tests, not skip them
import pytest
from moondream.finetune import Finetune
from moondream.types import Base64EncodedImage
from support import serving

from lightning_moondream.api import AsyncTuningClient, NotFoundError, TuningClient
from lightning_moondream.api.errors import InvalidRequestError, TuningAPIError
from lightning_moondream.api.inference import AsyncInferenceClient, InferenceClient
from lightning_moondream.api.inference_models import checkpoint_model_id, model_id
from lightning_moondream.api.models import DetectRequest
from lightning_moondream.data import synthetic
from lightning_moondream.images import encode_image
from lightning_moondream.rewards import ground_truth_reward
from lightning_moondream.server import FaultConfig, create_app
from lightning_moondream.server.faults import check_latency, endpoint_of

KEY = "inference-test-key"
OTHER_KEY = "another-inference-key"
GREEDY = {"temperature": 0.0}
SCENES = range(4)


@dataclass(frozen=True)
class Prompt:
    """A detect, point and query prompt about one synthetic scene."""

    image: Base64EncodedImage
    phrase: str
    question: str
    boxes: list[dict[str, float]]


def _prompt(index: int) -> Prompt:
    scene = synthetic.make_scene(synthetic.split_seed("test", index))
    phrase, boxes = synthetic.detect_tasks(scene)[0]
    question = synthetic.query_tasks(scene)[0][0]
    truth = [dict(zip(("x_min", "y_min", "x_max", "y_max"), b, strict=True)) for b in boxes]
    return Prompt(Base64EncodedImage(image_url=encode_image(scene.image)), phrase, question, truth)


PROMPTS = [_prompt(index) for index in SCENES]


def _greedy_rollouts(ft: Finetune) -> list[dict[str, Any]]:
    """The greedy rollout of each prompt's detect, point and query, through ``/rollouts``."""
    answers = []
    for prompt in PROMPTS:

        def output(skill: str, prompt: Prompt = prompt, **fields: Any) -> Any:
            answer = ft.rollouts(skill, image=prompt.image, settings=GREEDY, **fields)
            (rollout,) = answer["rollouts"]
            return rollout["output"]

        answers.append(
            {
                "objects": output("detect", object=prompt.phrase)["objects"],
                "points": output("point", object=prompt.phrase)["points"],
                "answer": output("query", question=prompt.question)["answer"],
            }
        )
    return answers


def _answers(vl: Any) -> list[dict[str, Any]]:
    """Each prompt's greedy detect, point and query through ``md.vl``."""
    return [
        {
            "objects": vl.detect(prompt.image, prompt.phrase, settings=GREEDY)["objects"],
            "points": vl.point(prompt.image, prompt.phrase, settings=GREEDY)["points"],
            "answer": vl.query(prompt.image, prompt.question, settings=GREEDY)["answer"],
        }
        for prompt in PROMPTS
    ]


def _shift(prompt: Prompt) -> dict[str, Any]:
    """An SFT group teaching a box away from the truth, so the weights move visibly."""
    wrong = {"x_min": 0.0, "y_min": 0.0, "x_max": 0.25, "y_max": 0.25}
    return {
        "mode": "sft",
        "request": {"skill": "detect", "image": prompt.image, "object": prompt.phrase},
        "target": {"boxes": [wrong]},
    }


@dataclass(frozen=True)
class Trained:
    """A finetune with checkpoints at steps 1 and 3, and the greedy rollouts at each."""

    url: str
    ft: Finetune
    rollouts: dict[int, list[dict[str, Any]]]
    untrained: list[dict[str, Any]]

    @property
    def endpoint(self) -> str:
        return self.url.removesuffix("/tuning")

    def vl(self, model: str | None = None, key: str = KEY) -> Any:
        return moondream.vl(endpoint=self.endpoint, api_key=key, model=model)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    app = create_app(
        data_dir=tmp_path_factory.mktemp("inference"),
        api_keys=[KEY, OTHER_KEY],
        checkpoint_retention=3600,
        seed=5,
    )
    with serving(app) as url:
        untrained = _greedy_rollouts(moondream.ft(KEY, name="untrained", rank=16, endpoint=url))
        ft = moondream.ft(KEY, name="inference", rank=16, endpoint=url)
        rollouts = {}
        for step in (1, 2, 3):
            ft.train_step([_shift(prompt) for prompt in PROMPTS], lr=2e-2)
            if step != 2:
                assert ft.save_checkpoint()["checkpoint"]["step"] == step
                rollouts[step] = _greedy_rollouts(ft)
        yield Trained(url, ft, rollouts, untrained)


def _http_error(call: Callable[[], Any]) -> tuple[int, str]:
    with pytest.raises(urllib.error.HTTPError) as caught:
        call()
    return caught.value.code, json.loads(caught.value.read())["error"]["message"]


# Interop with the official SDK ----------------------------------------------------------


def test_each_checkpoint_answers_from_its_own_weights(trained: Trained) -> None:
    first, third = (_answers(trained.vl(trained.ft.model(step))) for step in (1, 3))
    # Each equals the greedy rollout of its checkpoint, taken when it was saved: the
    # step-1 model does not follow the finetune's current (step 3) weights.
    assert first == trained.rollouts[1]
    assert third == trained.rollouts[3]
    assert first != third
    assert any(a["objects"] != b["objects"] for a, b in zip(first, third, strict=True))


def test_the_base_model_answers_as_an_untrained_finetune(trained: Trained) -> None:
    assert _answers(trained.vl()) == trained.untrained
    assert _answers(trained.vl("moondream3-preview")) == trained.untrained


def test_query_and_caption_stream_what_they_answer(trained: Trained) -> None:
    vl = trained.vl(trained.ft.model(3))
    prompt = PROMPTS[0]
    answer = vl.query(prompt.image, prompt.question, settings=GREEDY)["answer"]
    streamed = vl.query(prompt.image, prompt.question, stream=True, settings=GREEDY)["answer"]
    assert "".join(streamed) == answer == trained.rollouts[3][0]["answer"]
    # Without an image, the policy reads a blank one, as a query rollout without one does.
    blind = vl.query(question=prompt.question, settings=GREEDY)["answer"]
    (rollout,) = trained.ft.rollouts("query", question=prompt.question, settings=GREEDY)["rollouts"]
    assert blind == rollout["output"]["answer"]
    captions = {}
    for length in ("short", "normal", "long"):
        caption = vl.caption(prompt.image, length=length, settings=GREEDY)["caption"]
        chunks = list(
            vl.caption(prompt.image, length=length, stream=True, settings=GREEDY)["caption"]
        )
        assert len(chunks) > 1 and "".join(chunks) == caption
        captions[length] = caption
    # The caption is what the model answers when asked to count each shape.
    for shape in synthetic.SHAPES:
        count = vl.query(prompt.image, f"How many {shape}s are there?", settings=GREEDY)["answer"]
        if count.isdigit() and int(count) > 0:
            assert f"{count} {shape}" in captions["short"]
        else:
            assert shape not in captions["short"]
    short = captions["short"]
    assert captions["normal"] in (
        f"An image of {short[0].lower()}{short[1:]}",
        "An image with no shapes.",
    )
    assert captions["long"].startswith(captions["normal"][:-1])


def test_query_reasoning_is_answered_as_the_cloud_does(trained: Trained) -> None:
    vl = trained.vl(trained.ft.model(1))
    prompt = PROMPTS[1]
    plain = vl.query(prompt.image, prompt.question, settings=GREEDY)
    assert "reasoning" not in plain
    reasoned = vl.query(
        prompt.image, prompt.question, settings=GREEDY, reasoning=True, spatial_refs=[[0.2, 0.4]]
    )
    assert reasoned["answer"] == plain["answer"]
    text = reasoned["reasoning"]["text"]
    assert text == f"Looking at the marked region, the answer is {plain['answer']}."
    (grounding,) = reasoned["reasoning"]["grounding"]
    assert text[grounding["start_idx"] : grounding["end_idx"]] == "the marked region"
    assert grounding["points"] == [[0.2, 0.4]]


def test_caption_reports_metrics_and_where_it_stopped(trained: Trained) -> None:
    body = {"image_url": PROMPTS[2].image.image_url, "length": "long", "settings": GREEDY}
    headers = {"X-Moondream-Auth": KEY}
    whole = httpx.post(f"{trained.endpoint}/caption", json=body, headers=headers).json()
    assert whole["finish_reason"] == "stop"
    assert whole["metrics"]["output_tokens"] == len(whole["caption"].split())
    assert whole["metrics"]["input_tokens"] > 0 and whole["request_id"].startswith("caption_")
    cut = {**body, "settings": {**GREEDY, "max_tokens": 3}}
    short = httpx.post(f"{trained.endpoint}/caption", json=cut, headers=headers).json()
    assert short["finish_reason"] == "length"
    assert short["caption"] == " ".join(whole["caption"].split()[:3])
    assert short["metrics"]["output_tokens"] == 3


# Models that cannot answer --------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "status"),
    [
        ("moondream3-preview/{ft}", 400),
        ("moondream3-preview/{ft}@latest", 400),
        ("{ft}@1", 400),
        ("moondream2", 404),
        ("moondream3-preview/{ft}@2", 404),
        ("moondream3-preview/{ft}@chk_099", 404),
        ("moondream3-preview/0123456789abcdef@1", 404),
    ],
)
def test_a_model_that_cannot_answer_is_refused_by_name(
    trained: Trained, model: str, status: int
) -> None:
    model = model.format(ft=trained.ft.finetune_id)
    prompt = PROMPTS[0]
    code, message = _http_error(lambda: trained.vl(model).detect(prompt.image, prompt.phrase))
    assert code == status and repr(model) in message


def test_a_missing_step_lists_the_saved_ones(trained: Trained) -> None:
    model = trained.ft.model(2)
    code, message = _http_error(lambda: trained.vl(model).point(PROMPTS[0].image, "circle"))
    assert code == 404 and "saved at steps 1, 3" in message


def test_another_keys_finetune_is_not_found_and_a_wrong_key_is_refused(trained: Trained) -> None:
    prompt = PROMPTS[0]
    model = trained.ft.model(1)
    code, message = _http_error(
        lambda: trained.vl(model, key=OTHER_KEY).detect(prompt.image, prompt.phrase)
    )
    assert code == 404 and repr(model) in message
    code, message = _http_error(
        lambda: trained.vl(model, key="wrong-key").detect(prompt.image, prompt.phrase)
    )
    assert code == 401 and message == "invalid API key"
    missing = httpx.post(f"{trained.endpoint}/query", json={"question": "hi"})
    assert missing.status_code == 401


def test_deleted_checkpoints_and_finetunes_stop_answering(trained: Trained) -> None:
    ft = moondream.ft(KEY, name="short-lived", rank=16, endpoint=trained.url)
    ft.train_step([_shift(PROMPTS[0])], lr=1e-2)
    ft.save_checkpoint()
    vl = trained.vl(ft.model(1))
    prompt = PROMPTS[0]
    assert vl.detect(prompt.image, prompt.phrase)["objects"] is not None
    ft.delete_checkpoint(1)
    code, message = _http_error(lambda: vl.detect(prompt.image, prompt.phrase))
    assert code == 404 and repr(ft.model(1)) in message and "it has none" in message
    ft.save_checkpoint()
    ft.delete()
    code, message = _http_error(lambda: vl.detect(prompt.image, prompt.phrase))
    assert code == 404 and "unknown or deleted" in message


def test_an_expired_checkpoint_is_not_found(tmp_path: Path) -> None:
    with TuningClient.local(data_dir=tmp_path, checkpoint_retention=0) as tuning:
        finetune = tuning.adapters.create("expiring", rank=16)
        tuning.checkpoints.save(finetune.adapter_id)
        inference = InferenceClient.for_tuning(tuning, model=model_id(finetune.adapter_id, 0))
        with pytest.raises(NotFoundError, match="has expired"):
            inference.detect(PROMPTS[0].image.image_url, "circle")


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/detect", {"object": "x", "colour": 1}, 422, "colour: not a field of /detect"),
        ("/detect", {"object": "x", "stream": True}, 422, "stream: /detect does not stream"),
        ("/point", {"object": ""}, 422, "body.object"),
        ("/query", {"question": "q", "settings": {"temperature": 5}}, 422, "settings.temperature"),
        ("/caption", {"length": "medium"}, 422, "length: must be one of short, normal, long"),
        ("/caption", {"settings": {"max_objects": 2}}, 422, "settings.max_objects"),
        ("/caption", {"settings": {"max_tokens": 0}}, 422, "settings.max_tokens"),
        ("/caption", {"image_url": None}, 422, "image_url: field required"),
        ("/detect", {"object": "x", "image_url": "data:image/png;base64,AAAA"}, 400, "image_url"),
    ],
)
def test_bad_requests_name_the_field(
    trained: Trained, path: str, body: dict[str, Any], status: int, message: str
) -> None:
    full = {"image_url": PROMPTS[0].image.image_url, **body}
    answer = httpx.post(f"{trained.endpoint}{path}", json=full, headers={"X-Moondream-Auth": KEY})
    assert answer.status_code == status and message in answer.json()["error"]["message"]


# Our clients, the embedded service, middleware ------------------------------------------


def test_greedy_inference_scores_as_greedy_rollouts_on_one_embedded_service() -> None:
    with TuningClient.local(dialect="finetunes") as tuning:
        finetune = tuning.adapters.create("scored", rank=16)
        requests = [
            DetectRequest(image_url=p.image.image_url, object=p.phrase, settings=GREEDY)
            for p in PROMPTS
        ]
        tuning.train_step(
            finetune.adapter_id,
            [
                {
                    "mode": "sft",
                    "request": requests[0].to_json(),
                    "target": {"boxes": PROMPTS[0].boxes},
                }
            ],
            lr=1e-2,
        )
        tuning.checkpoints.save(finetune.adapter_id)
        inference = InferenceClient.for_tuning(tuning, model=model_id(finetune.adapter_id, 1))
        through_rollouts, through_inference = [], []
        for prompt, request in zip(PROMPTS, requests, strict=True):
            truth = {"boxes": prompt.boxes}
            (rollout,) = tuning.rollouts(finetune.adapter_id, request, 1).rollouts
            boxes = rollout.output["boxes"]
            through_rollouts.append(ground_truth_reward("detect", {"boxes": boxes}, truth))
            detected = inference.detect(prompt.image.image_url, prompt.phrase, settings=GREEDY)
            objects = [box.model_dump() for box in detected.objects]
            through_inference.append(ground_truth_reward("detect", {"boxes": objects}, truth))
            assert objects == boxes
        assert through_inference == through_rollouts
        inference.close()
        assert tuning.adapters.get(finetune.adapter_id).name == "scored"


def test_adapters_checkpoints_are_models_by_id_or_step() -> None:
    with TuningClient.local(dialect="adapters") as tuning:
        adapter = tuning.adapters.create("by-id", rank=16)
        saved = tuning.checkpoints.save(adapter.adapter_id)
        by_id = checkpoint_model_id(saved.checkpoint_id)
        assert by_id == f"moondream3-preview/{saved.checkpoint_id.replace('/', '@')}"
        inference = InferenceClient.for_tuning(tuning)
        prompt = PROMPTS[3]
        (rollout,) = tuning.rollouts(
            adapter.adapter_id,
            DetectRequest(image_url=prompt.image.image_url, object=prompt.phrase, settings=GREEDY),
            1,
        ).rollouts
        for model in (by_id, model_id(adapter.adapter_id, 0)):
            answer = inference.detect(
                prompt.image.image_url, prompt.phrase, model=model, settings=GREEDY
            )
            assert [box.model_dump() for box in answer.objects] == rollout.output["boxes"]
        tuning.checkpoints.delete(saved.checkpoint_id)
        with pytest.raises(NotFoundError, match=repr(by_id)):
            inference.detect(prompt.image.image_url, prompt.phrase, model=by_id)


def test_local_clients_answer_in_process() -> None:
    prompt = PROMPTS[1]
    with InferenceClient.local(policy="constant") as client:
        assert client.detect(prompt.image.image_url, "circle").objects
        assert "".join(client.caption_stream(prompt.image.image_url, length="short"))
        with pytest.raises(InvalidRequestError, match="model must be"):
            client.point(prompt.image.image_url, "circle", model="moondream3-preview/x")

    async def run() -> tuple[str, str]:
        async with AsyncInferenceClient.local(policy="constant") as client:
            answer = await client.query(prompt.image.image_url, "What color is the square?")
            chunks = [c async for c in client.query_stream(prompt.image.image_url, "q?")]
            return answer.answer, "".join(chunks)

    assert asyncio.run(run()) == ("yes", "yes")

    async def shared() -> list[Any]:
        async with AsyncTuningClient.local(policy="constant") as tuning:
            finetune = await tuning.adapters.create("shared", rank=16)
            saved = await tuning.checkpoints.save(finetune.adapter_id)
            inference = AsyncInferenceClient.for_tuning(tuning)
            answer = await inference.detect(
                prompt.image.image_url, "circle", model=checkpoint_model_id(saved.ref)
            )
            await inference.close()
            # Closing the inference client leaves the tuning client's service open.
            await tuning.adapters.get(finetune.adapter_id)
            return answer.objects

    assert asyncio.run(shared())


def test_auth_limits_and_faults_apply_to_inference(tmp_path: Path) -> None:
    assert endpoint_of("/v1/detect") == "inference" and endpoint_of("/v1/segment") is None
    assert check_latency({"inference": 0.05}) == {"inference": 0.05}
    faults = FaultConfig(rate=1.0, kinds=("503",), endpoints=("inference",))
    app = create_app(data_dir=tmp_path, policy="constant", faults=faults)
    with serving(app) as url:
        endpoint = url.removesuffix("/tuning")
        headers = {"X-Moondream-Auth": KEY}
        failed = httpx.post(f"{endpoint}/query", json={"question": "q"}, headers=headers)
        assert failed.status_code == 503
        assert failed.json()["error"]["message"] == "injected failure (503)"
        made = httpx.post(f"{url}/finetunes", json={"name": "x", "rank": 16}, headers=headers)
        assert made.status_code == 200
    with InferenceClient.local(data_dir=tmp_path / "small", max_body_bytes=512) as client:
        with pytest.raises(TuningAPIError, match="413") as caught:
            client.detect(PROMPTS[0].image.image_url, "circle")
        assert caught.value.status_code == 413


def test_our_clients_stream_over_their_own_transports(trained: Trained) -> None:
    prompt = PROMPTS[0]
    image, model = prompt.image.image_url, trained.ft.model(3)
    answer = trained.rollouts[3][0]["answer"]
    with InferenceClient(api_key=KEY, tuning_url=trained.url, model=model) as client:
        chunks = list(client.query_stream(image, prompt.question, settings=GREEDY))
        caption = client.caption(image, length="short", settings=GREEDY).caption
        caption_chunks = list(client.caption_stream(image, length="short", settings=GREEDY))

    async def streamed() -> list[str]:
        async with AsyncInferenceClient(api_key=KEY, tuning_url=trained.url, model=model) as aio:
            stream = aio.query_stream(image, prompt.question, settings=GREEDY)
            return [chunk async for chunk in stream]

    assert "".join(chunks) == answer
    assert len(caption_chunks) > 1 and "".join(caption_chunks) == caption
    assert "".join(asyncio.run(streamed())) == answer
