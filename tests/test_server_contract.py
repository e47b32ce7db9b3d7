"""The API client against the local service over real HTTP: the contract both sides share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import serving

from lightning_moondream.api import TuningClient
from lightning_moondream.data import synthetic
from lightning_moondream.images import encode_image
from lightning_moondream.server import create_app


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TuningClient]:
    with serving(create_app(data_dir=tmp_path, api_keys={"contract-key"})) as url:
        tuning = TuningClient(api_key="contract-key", base_url=url, dialect="adapters")
        try:
            yield tuning
        finally:
            tuning.close()


def test_client_round_trip(client: TuningClient) -> None:
    adapter = client.adapters.create("contract", 16)
    assert client.adapters.get(adapter.adapter_id).train_steps == 0
    assert [item.adapter_id for item in client.adapters.list().items] == [adapter.adapter_id]
    scene = synthetic.make_scene(synthetic.split_seed("val", 2))
    phrase, boxes = synthetic.detect_tasks(scene)[0]
    request = {"skill": "detect", "object": phrase, "image_url": encode_image(scene.image)}
    truth = {
        "boxes": [
            dict(zip(("x_min", "y_min", "x_max", "y_max"), box, strict=True)) for box in boxes
        ]
    }
    response = client.rollouts(adapter.adapter_id, request, 4, ground_truth=truth)
    assert len(response.rollouts) == 4 and response.rewards is not None
    client.train_step(adapter.adapter_id, [response.to_group([0.0, 1.0, 0.5, 0.25])])
    assert client.adapters.get(adapter.adapter_id).train_steps == 1
    checkpoint = client.checkpoints.save(adapter.adapter_id)
    assert [item.checkpoint_id for item in client.checkpoints.list(adapter.adapter_id).items] == [
        checkpoint.checkpoint_id
    ]
    restored = client.adapters.create("restored", 16, from_checkpoint=checkpoint.checkpoint_id)
    client.checkpoints.delete(checkpoint.checkpoint_id)
    assert client.checkpoints.list(adapter.adapter_id).items == []
    client.adapters.delete(restored.adapter_id)
    client.adapters.delete(adapter.adapter_id)
    assert client.adapters.list().items == []
