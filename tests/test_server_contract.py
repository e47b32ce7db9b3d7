"""The API client against the local service over real HTTP: the contract both sides share.

Each test runs in each wire dialect (ids ``adapters`` and ``finetunes``) against a
service serving that dialect alone; what only one dialect carries is tested there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import serving

from lightning_moondream.api import NotFoundError, TuningClient
from lightning_moondream.api.operations import DIALECTS, Dialect
from lightning_moondream.data import synthetic
from lightning_moondream.images import encode_image
from lightning_moondream.server import create_app

KEY = "contract-key"


@pytest.fixture(params=DIALECTS)
def dialect(request: pytest.FixtureRequest) -> Dialect:
    """The wire dialect the service serves and the client speaks."""
    return request.param


@pytest.fixture
def client(tmp_path: Path, dialect: Dialect) -> Iterator[TuningClient]:
    with serving(create_app(data_dir=tmp_path, api_keys={KEY}, dialect=dialect)) as url:
        tuning = TuningClient(api_key=KEY, base_url=url, dialect=dialect)
        try:
            yield tuning
        finally:
            tuning.close()


def detect_request(index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A detect request over a synthetic scene, and its ground truth."""
    scene = synthetic.make_scene(synthetic.split_seed("val", index))
    phrase, boxes = synthetic.detect_tasks(scene)[0]
    request = {"skill": "detect", "object": phrase, "image_url": encode_image(scene.image)}
    truth = {
        "boxes": [
            dict(zip(("x_min", "y_min", "x_max", "y_max"), box, strict=True)) for box in boxes
        ]
    }
    return request, truth


def test_client_round_trip(client: TuningClient) -> None:
    adapter = client.adapters.create("contract", 16)
    assert client.adapters.get(adapter.adapter_id).train_steps == 0
    request, truth = detect_request(2)
    response = client.rollouts(adapter.adapter_id, request, 4, ground_truth=truth)
    assert len(response.rollouts) == 4 and response.rewards is not None
    client.train_step(adapter.adapter_id, [response.to_group([0.0, 1.0, 0.5, 0.25])])
    assert client.adapters.get(adapter.adapter_id).train_steps == 1
    checkpoint = client.checkpoints.save(adapter.adapter_id)
    assert checkpoint.adapter_id == adapter.adapter_id
    assert [item.ref for item in client.checkpoints.list(adapter.adapter_id).items] == [
        checkpoint.ref
    ]
    client.checkpoints.delete(checkpoint.ref)
    assert client.checkpoints.list(adapter.adapter_id).items == []
    client.adapters.delete(adapter.adapter_id)
    with pytest.raises(NotFoundError, match=adapter.adapter_id):
        client.adapters.get(adapter.adapter_id)


@pytest.mark.parametrize("dialect", ["adapters"])
def test_adapters_list_and_start_from_a_checkpoint(client: TuningClient) -> None:
    """Only ``/adapters`` lists adapters and makes one from a checkpoint."""
    adapter = client.adapters.create("contract", 16)
    assert [item.adapter_id for item in client.adapters.list().items] == [adapter.adapter_id]
    checkpoint = client.checkpoints.save(adapter.adapter_id)
    restored = client.adapters.create("restored", 16, from_checkpoint=checkpoint.checkpoint_id)
    assert client.adapters.get(restored.adapter_id).train_steps == 0
    client.adapters.delete(restored.adapter_id)
    client.adapters.delete(adapter.adapter_id)
    assert client.adapters.list().items == []


@pytest.mark.parametrize("dialect", ["finetunes"])
def test_finetunes_report_steps_take_sft_and_lr_and_log_metrics(client: TuningClient) -> None:
    """Only ``/finetunes`` reports a train step, takes SFT groups and ``lr``, logs metrics."""
    finetune = client.adapters.create("contract", 16)
    request, truth = detect_request(3)
    response = client.rollouts(finetune.adapter_id, request, 2)
    sft = {"mode": "sft", "request": request, "target": truth}
    report = client.train_step(finetune.adapter_id, [response.to_group([0.0, 1.0]), sft], lr=1e-3)
    assert (report.step, report.applied) == (1, True)
    assert report.sft_loss is not None and report.reward_mean == pytest.approx(0.5)
    measured = client.train_step(finetune.adapter_id, [sft], lr=0)
    assert (measured.step, measured.applied) == (1, False)
    assert client.metrics.log(finetune.adapter_id, 1, {"reward": 0.5}) == 1
    assert [
        (m["step"], m["name"], m["value"]) for m in client.metrics.read(finetune.adapter_id)
    ] == [(1, "reward", 0.5)]
    checkpoint = client.checkpoints.save(finetune.adapter_id)
    assert checkpoint.ref == f"{finetune.adapter_id}@1"
    assert checkpoint.model_id == f"moondream3-preview/{finetune.adapter_id}@1"
