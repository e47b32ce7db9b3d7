"""The local tuning service over real HTTP on 127.0.0.1: uvicorn, ``serve``, the client."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import free_port, serve_command, serving, wait_for_serve

from lightning_moondream.data import synthetic
from lightning_moondream.images import encode_image
from lightning_moondream.server import FaultConfig, create_app

KEY = {"X-Moondream-Auth": "http-key"}


@pytest.fixture
def base_url(tmp_path: Path) -> Iterator[str]:
    with serving(create_app(data_dir=tmp_path)) as url:
        yield url


def test_full_loop_over_http(base_url: str) -> None:
    scene = synthetic.make_scene(synthetic.split_seed("val", 0))
    phrase, boxes = synthetic.detect_tasks(scene)[0]
    truth = {
        "boxes": [
            dict(zip(("x_min", "y_min", "x_max", "y_max"), box, strict=True)) for box in boxes
        ]
    }
    request = {"skill": "detect", "object": phrase, "image_url": encode_image(scene.image)}
    with httpx.Client(base_url=base_url, headers=KEY) as client:
        adapter_id = client.post("/adapters", json={"name": "h", "rank": 16}).json()["adapter_id"]
        answer = client.post(
            "/rollouts",
            json={
                "adapter_id": adapter_id,
                "num_rollouts": 4,
                "request": request,
                "ground_truth": truth,
            },
        ).json()
        assert len(answer["rewards"]) == 4
        group = {
            "request": answer["request"],
            "rollouts": answer["rollouts"],
            "rewards": [0.0, 1.0, 0.0, 1.0],
        }
        assert (
            client.post("/train_step", json={"adapter_id": adapter_id, "groups": [group]}).json()
            == {}
        )
        checkpoint_id = client.post(f"/adapters/{adapter_id}/checkpoint").json()["checkpoint_id"]
        # The raw slash of a full checkpoint id survives a real HTTP server too.
        assert client.delete(f"/adapters/{adapter_id}/checkpoints/{checkpoint_id}").json() == {}
        assert client.get(f"/adapters/{adapter_id}").json()["train_steps"] == 1
        assert client.get("/adapters", headers={"X-Moondream-Auth": ""}).status_code == 401


def test_dropped_connection_over_http(tmp_path: Path) -> None:
    app = create_app(data_dir=tmp_path, faults=FaultConfig(rate=1.0, kinds=("drop",)))
    with (
        serving(app) as url,
        httpx.Client(base_url=url, headers=KEY) as client,
        pytest.raises(httpx.TransportError),
    ):
        client.get("/adapters")


def test_serve_command_answers_plain_http(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MOONDREAM_API_KEY": "from-env-key"}
    process = subprocess.Popen(
        serve_command(port, tmp_path),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/tuning/adapters"
        response = wait_for_serve(process, url, "from-env-key")
        assert response.json() == {"adapters": [], "next_cursor": None}
        assert httpx.get(url, headers={"X-Moondream-Auth": "other"}).status_code == 401
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "from-env-key" not in output
    assert "1 API key(s) configured" in output
