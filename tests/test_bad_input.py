"""Bad input gives a clear error that names the culprit; a run that meets one saves first.

The corpus covers dataset files, images, configuration (module, data module, CLI YAML),
batches, reward functions and malformed server answers. Each case asserts the error's
type and the words that point at the culprit (file and line, field, value).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import torch
from PIL import Image
from pydantic import SecretStr
from support import (
    alternating_reward,
    detect_samples,
    loader,
    on_exception_trainer,
    quiet_trainer,
)

from lightning_moondream.api import InvalidRequestError, ServerError, TuningClient
from lightning_moondream.data import DatasetError, MoondreamDataModule, load_dataset
from lightning_moondream.data.encoding import EncodedDataset
from lightning_moondream.images import EncodingOptions
from lightning_moondream.module import CHECKPOINT_KEY, MoondreamRLModule
from lightning_moondream.scoring import Scorer

GOOD_BOX = [[0.1, 0.1, 0.4, 0.5]]


def _line(**fields: Any) -> str:
    return json.dumps(
        {"image": "ok.jpg", "skill": "detect", "object": "dog", "boxes": GOOD_BOX, **fields}
    )


# (name, manifest text, words the error must contain)
MANIFESTS: list[tuple[str, str, list[str]]] = [
    ("malformed-json", '{"image": "ok.jpg", "skill": "detect"', ["line 1", "malformed JSON"]),
    ("not-an-object", "[1, 2, 3]", ["line 1", "must be a JSON object"]),
    (
        "missing-object",
        json.dumps({"image": "ok.jpg", "skill": "detect", "boxes": []}),
        ["line 1", "'object'"],
    ),
    ("object-wrong-type", _line(object=7), ["line 1", "'object' must be a non-empty string"]),
    ("unknown-skill", _line(skill="segment"), ["line 1", "'skill'", "'segment'"]),
    ("boxes-wrong-type", _line(boxes="0.1 0.1 0.4 0.5"), ["line 1", "'boxes' must be a list"]),
    ("box-nan", _line(boxes=[[math.nan, 0.1, 0.4, 0.5]]), ["line 1", "'dog' box 0", "not finite"]),
    ("box-three-numbers", _line(boxes=[[0.1, 0.1, 0.4]]), ["line 1", "boxes[0]", "4 numbers"]),
    (
        "answers-wrong-type",
        json.dumps({"skill": "query", "question": "How many?", "answers": 3}),
        ["line 1", "'answers'"],
    ),
    ("second-line-bad", _line() + "\n" + _line(skill="segment"), ["line 2", "'segment'"]),
]


@pytest.mark.parametrize(("name", "text", "words"), MANIFESTS, ids=[case[0] for case in MANIFESTS])
def test_bad_manifest_lines_name_the_file_and_line(
    tmp_path: Path, name: str, text: str, words: list[str]
) -> None:
    Image.new("RGB", (64, 48)).save(tmp_path / "ok.jpg")
    path = tmp_path / f"{name}.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(DatasetError) as raised:
        load_dataset(path)
    message = str(raised.value)
    assert str(path) in message
    for word in words:
        assert word in message


IMAGES: list[tuple[str, Callable[[Path], object], str]] = [
    (
        "corrupt.jpg",
        lambda path: path.write_bytes(b"\xff\xd8\xff not a jpeg"),
        "not a readable image",
    ),
    ("empty.png", lambda path: path.write_bytes(b""), "not a readable image"),
    ("text.png", lambda path: path.write_text("hello"), "not a readable image"),
    ("huge.png", lambda path: Image.new("1", (8000, 6000)).save(path), "exceeds the limit"),
    ("missing.jpg", lambda path: None, "cannot read image file"),
]


@pytest.mark.parametrize(("filename", "make", "words"), IMAGES, ids=[case[0] for case in IMAGES])
def test_bad_images_name_the_file_and_sample(
    tmp_path: Path, filename: str, make: Callable[[Path], object], words: str
) -> None:
    make(tmp_path / filename)
    manifest = tmp_path / "data.jsonl"
    manifest.write_text(_line(image=filename, id="sample-7") + "\n")
    encoded = EncodedDataset(load_dataset(manifest), EncodingOptions(max_side=None))
    with pytest.raises(DatasetError) as raised:
        encoded[0]
    message = str(raised.value)
    assert str(tmp_path / filename) in message
    assert "sample 'sample-7'" in message
    assert words in message


CONFIGS: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("rank", lambda: MoondreamRLModule(rank=12), ValueError, "rank must be 8, 16, 24 or 32"),
    (
        "num_rollouts",
        lambda: MoondreamRLModule(num_rollouts=17),
        ValueError,
        "num_rollouts must be from 2 to 16, got 17",
    ),
    (
        "max_staleness",
        lambda: MoondreamRLModule(max_staleness=2),
        ValueError,
        "max_staleness must be 0 or 1, got 2",
    ),
    (
        "max_concurrency",
        lambda: MoondreamRLModule(max_concurrency=0),
        ValueError,
        "max_concurrency must be at least 1",
    ),
    (
        "dialect",
        lambda: MoondreamRLModule(dialect="cloud"),  # type: ignore[arg-type]
        ValueError,
        "dialect must be one of auto, adapters, finetunes, got 'cloud'",
    ),
    (
        "on_ambiguous_step",
        lambda: MoondreamRLModule(on_ambiguous_step="maybe"),  # type: ignore[arg-type]
        ValueError,
        "on_ambiguous_step must be 'raise' or 'skip', got 'maybe'",
    ),
    (
        "reward-name",
        lambda: MoondreamRLModule(reward="no_such_reward"),
        ValueError,
        "no_such_reward",
    ),
    (
        "batch_size",
        lambda: MoondreamDataModule(batch_size=0),
        ValueError,
        "batch_size must be at least 1, got 0",
    ),
    (
        "synthetic-skill",
        lambda: MoondreamDataModule(
            train={"source": "synthetic", "num_images": 4, "skills": ["segment"]}
        ).setup("fit"),
        ValueError,
        "'segment'",
    ),
    (
        "missing-source",
        lambda: MoondreamDataModule(train="/no/such/dataset").setup("fit"),
        DatasetError,
        "/no/such/dataset: no such file or folder",
    ),
]


@pytest.mark.parametrize(
    ("name", "build", "error", "words"), CONFIGS, ids=[case[0] for case in CONFIGS]
)
def test_bad_settings_are_refused_by_name(
    name: str, build: Callable[[], Any], error: type[Exception], words: str
) -> None:
    with pytest.raises(error) as raised:
        build()
    assert words in str(raised.value)


@pytest.mark.parametrize(
    ("yaml_text", "words"),
    [
        ("model:\n  init_args:\n    rnak: 16\n", "rnak"),
        ("model:\n  init_args:\n    rank: sixteen\n", "rank"),
        ("trainer:\n  max_stepz: 3\n", "max_stepz"),
    ],
    ids=["unknown-key", "wrong-type", "unknown-trainer-key"],
)
def test_bad_cli_config_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], yaml_text: str, words: str
) -> None:
    from lightning_moondream.cli import main

    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(SystemExit) as raised:
        main(["fit", "--config", str(config)])
    assert raised.value.code != 0
    assert words in capsys.readouterr().err


class NotASample:
    skill = "segment"


@pytest.mark.parametrize(
    ("batch", "error", "words"),
    [
        ([], ValueError, "batch 3 is empty"),
        ("not a batch", TypeError, "batch 3 is a str"),
        ({"image": "x"}, TypeError, "batch 3 is a dict"),
        ([NotASample()], TypeError, "batch 3 item 0 is a NotASample"),
        ([None], TypeError, "batch 3 item 0 is a NoneType"),
    ],
    ids=["empty", "string", "dict", "wrong-item", "none-item"],
)
def test_bad_batches_are_refused_before_any_request(
    batch: Any, error: type[Exception], words: str
) -> None:
    model = MoondreamRLModule(base_url="http://127.0.0.1:9/v1/tuning", api_key=SecretStr("unused"))
    with pytest.raises(error) as raised:
        model.training_step(batch, 3)
    assert words in str(raised.value)
    # Refused before connecting: nothing was sent anywhere.
    assert not model.session.connection.connected


def _rollout(skill: str, output: dict[str, Any]) -> dict[str, Any]:
    """One rollout of ``skill`` as the service answers it, one token long."""
    return {
        "skill": skill,
        "output": output,
        "answer_tokens": [1],
        "logprobs": [0.0],
        "signature": "s",
    }


@pytest.mark.parametrize("value", [math.nan, "0.5", None, True])
def test_a_reward_function_returning_a_non_number_names_the_sample(value: Any) -> None:
    import asyncio

    from lightning_moondream.api import RolloutsResponse

    sample = detect_samples("train", 1)[0]
    rollout = _rollout("detect", {"objects": []})
    response = RolloutsResponse(
        {"request": {"skill": "detect"}, "rollouts": [rollout], "rewards": None}
    )

    def bad_reward(sample: Any, rollout: Any) -> Any:
        return value

    with pytest.raises(ValueError) as raised:
        asyncio.run(Scorer(bad_reward).score(cast(Any, sample), response))
    assert f"sample {sample.id!r}" in str(raised.value)
    assert "bad_reward" in str(raised.value)


_REQUEST = {"skill": "point", "object": "dog"}
_ROLLOUT = _rollout("point", {"points": []})

SERVER_ANSWERS: list[tuple[str, bytes, str]] = [
    ("html", b"<html>gateway</html>", "Expecting value"),
    (
        "no-rollouts",
        json.dumps({"request": _REQUEST, "rewards": None}).encode(),
        "no 'rollouts' list",
    ),
    (
        "rollouts-not-list",
        json.dumps({"request": _REQUEST, "rollouts": {}, "rewards": None}).encode(),
        "no 'rollouts' list",
    ),
    ("no-request", json.dumps({"rollouts": [_ROLLOUT, _ROLLOUT]}).encode(), "no 'request' object"),
    (
        "rewards-wrong-length",
        json.dumps(
            {"request": _REQUEST, "rollouts": [_ROLLOUT, _ROLLOUT], "rewards": [0.5]}
        ).encode(),
        "1 rewards for 2 rollouts",
    ),
    (
        "reward-nan",
        b'{"request": {"skill": "point", "object": "dog"}, "rollouts": [%s, %s], "rewards": [NaN, 1]}'
        % (json.dumps(_ROLLOUT).encode(), json.dumps(_ROLLOUT).encode()),
        "rewards[0] is not finite",
    ),
    (
        "partial-group",
        json.dumps({"request": _REQUEST, "rollouts": [_ROLLOUT], "rewards": None}).encode(),
        "asked for 2 rollouts, got 1",
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "words"), SERVER_ANSWERS, ids=[case[0] for case in SERVER_ANSWERS]
)
def test_malformed_rollouts_answers_are_server_errors_naming_the_problem(
    name: str, body: bytes, words: str
) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    client = TuningClient(
        api_key="bad-input-key",
        base_url="http://test/v1/tuning",
        http_client=httpx.Client(transport=transport),
        max_retries=0,
        dialect="adapters",
    )
    with pytest.raises(ServerError) as raised:
        client.rollouts("ad_1", {"skill": "point", "object": "dog", "image_url": _tiny_image()}, 2)
    assert "POST /rollouts answered something that is not the API's JSON" in str(raised.value)
    assert words in str(raised.value)


def test_a_malformed_adapter_answer_names_the_missing_field() -> None:
    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, json={"name": "x", "rank": 16})
    )
    client = TuningClient(
        api_key="bad-input-key",
        base_url="http://test/v1/tuning",
        http_client=httpx.Client(transport=transport),
        dialect="adapters",
    )
    with pytest.raises(ServerError) as raised:
        client.adapters.get("ad_1")
    assert "GET /adapters/ad_1" in str(raised.value)
    assert "adapter_id" in str(raised.value)


@pytest.mark.parametrize(
    ("truth", "words"),
    [
        (
            {"boxes": [{"x_min": 0.1, "y_min": 0.1, "x_max": 1.5, "y_max": 0.2}]},
            "ground_truth.boxes.0.x_max",
        ),
        ({"boxes": [{"x_min": math.nan, "y_min": 0.1, "x_max": 0.5, "y_max": 0.2}]}, "finite"),
        (
            {"boxes": [{"x_min": 0.5, "y_min": 0.1, "x_max": 0.2, "y_max": 0.2}]},
            "x_min (0.5) must be less than x_max",
        ),
        ({"points": [{"x": -0.1, "y": 0.5}]}, "ground_truth.points.0.x"),
    ],
    ids=["box-out-of-range", "box-nan", "box-inverted", "point-negative"],
)
def test_bad_coordinates_are_refused_before_sending(truth: dict[str, Any], words: str) -> None:
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    transport = httpx.MockTransport(record)
    client = TuningClient(
        api_key="bad-input-key",
        base_url="http://test/v1/tuning",
        http_client=httpx.Client(transport=transport),
    )
    skill = "point" if "points" in truth else "detect"
    with pytest.raises(InvalidRequestError) as raised:
        client.rollouts(
            "ad_1", {"skill": skill, "object": "dog", "image_url": _tiny_image()}, 2, truth
        )
    assert words in str(raised.value)
    assert sent == []


def _tiny_image() -> str:
    import base64
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _loop_threads() -> int:
    return sum(thread.name == "lightning-moondream-loop" for thread in threading.enumerate())


def test_a_bad_sample_mid_run_stops_it_after_saving_the_steps_done(tmp_path: Path) -> None:
    """A corrupt image in the sixth sample: the first steps are checkpointed, locally and
    on the service, before the error surfaces."""
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "ok.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    lines = [_line(id=f"s{index}") for index in range(5)]
    lines.append(_line(image="broken.jpg", id="s5"))
    lines += [_line(id=f"s{index}") for index in range(6, 10)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    data = MoondreamDataModule(train=str(tmp_path / "train.jsonl"), batch_size=1, shuffle=False)
    service = tmp_path / "service"
    model = MoondreamRLModule(
        num_rollouts=2,
        reward=alternating_reward(),
        local_service={"data_dir": str(service), "policy": "constant"},
    )
    trainer = on_exception_trainer(tmp_path, max_steps=10)
    loops_before = _loop_threads()
    with pytest.raises(DatasetError) as raised:
        trainer.fit(model, data)
    assert str(tmp_path / "broken.jpg") in str(raised.value)
    assert "sample 's5'" in str(raised.value)
    # The failed run left no event loop thread behind.
    assert _loop_threads() == loops_before

    saved = torch.load(tmp_path / "ckpt" / "on_exception.ckpt", weights_only=False)
    done = saved["global_step"]
    # Lightning fetches one batch ahead, so the error comes after step 4 or step 5.
    assert done in (4, 5)
    state = saved[CHECKPOINT_KEY]
    assert state["train_steps"] == done
    with TuningClient.local(data_dir=service, policy="constant") as client:
        assert client.adapters.get(state["adapter_id"]).train_steps == done
        checkpoints = [item.ref for item in client.checkpoints.iter(state["adapter_id"])]
    assert state["checkpoint_id"] in checkpoints


def test_a_run_resumes_from_its_on_exception_checkpoint(tmp_path: Path) -> None:
    """The checkpoint saved on an error is a working resume point."""
    service = tmp_path / "service"
    samples = detect_samples("train", 6)
    bad_run: list[Any] = [*samples[:3], None, *samples[3:]]
    options: dict[str, Any] = {
        "num_rollouts": 2,
        "local_service": {"data_dir": str(service), "policy": "constant"},
    }
    first = MoondreamRLModule(reward=alternating_reward(), **options)
    trainer = on_exception_trainer(tmp_path, max_steps=6)
    with pytest.raises(TypeError, match="batch 3 item 0 is a NoneType"):
        trainer.fit(first, loader(bad_run, batch_size=1))
    on_exception = tmp_path / "ckpt" / "on_exception.ckpt"
    assert torch.load(on_exception, weights_only=False)["global_step"] == 3
    first_adapter = first.adapter.adapter_id

    second = MoondreamRLModule(reward=alternating_reward(), **options)
    trainer = quiet_trainer(tmp_path, max_steps=6)
    trainer.fit(second, loader(samples, batch_size=1), ckpt_path=on_exception)
    assert trainer.global_step == 6
    # The local service speaks /finetunes by default: the run goes on with the same
    # finetune, which was still at the checkpoint's step 3, and applies steps 4 to 6.
    assert second.adapter.adapter_id == first_adapter
    with TuningClient.local(data_dir=service, policy="constant") as client:
        assert client.adapters.get(first_adapter).train_steps == 6
