"""The local service's domain, called directly: plain values in, plain results out."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import pytest

from lightning_moondream.data import synthetic
from lightning_moondream.images import encode_image
from lightning_moondream.server import close_app, create_app
from lightning_moondream.server.errors import ServiceError
from lightning_moondream.server.service import Service

SERVER = Path(__file__).resolve().parents[1] / "lightning_moondream" / "server"
DOMAIN = [
    "errors",
    "finetunes",
    "results",
    "sampling",
    "service",
    "states",
    "store",
    "training",
    "validation",
]
HTTP_PACKAGES = {"fastapi", "starlette", "uvicorn", "httpx"}


def imported_packages(path: Path) -> set[str]:
    packages = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            packages.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            packages.add(node.module.partition(".")[0])
    return packages


@pytest.mark.parametrize("module", DOMAIN)
def test_the_domain_imports_nothing_of_http(module: str) -> None:
    assert imported_packages(SERVER / f"{module}.py") & HTTP_PACKAGES == set()


def _detect_request(temperature: float) -> dict[str, Any]:
    scene = synthetic.make_scene(synthetic.split_seed("val", 3))
    phrase, _ = synthetic.detect_tasks(scene)[0]
    return {
        "skill": "detect",
        "object": phrase,
        "image_url": encode_image(scene.image),
        "settings": {"temperature": temperature},
    }


def test_a_checkpoint_samples_as_the_adapter_did_when_it_was_saved(tmp_path: Path) -> None:
    app = create_app(data_dir=tmp_path, seed=1)
    service: Service = app.state.service
    owner = service.authenticate("domain-key")
    request = _detect_request(temperature=0.0)
    parsed = service.parse_request(request, "request")
    sft = {
        "mode": "sft",
        "request": request,
        "target": {"boxes": [{"x_min": 0.05, "y_min": 0.05, "x_max": 0.2, "y_max": 0.3}]},
    }

    async def scenario() -> None:
        adapter = await service.create_adapter(owner, "domain", 16)
        saved = await service.save_checkpoint(owner, adapter.adapter_id)
        assert saved.step == 0
        (before,) = await service.sample(service.state(adapter.adapter_id), parsed, 1)
        for _ in range(5):
            report = await service.train_step(owner, adapter.adapter_id, [sft], 3e-2)
        assert report.step == 5 and report.applied
        (trained,) = await service.sample(service.state(adapter.adapter_id), parsed, 1)
        assert trained.tokens != before.tokens

        state = await service.checkpoint_state(owner, adapter.adapter_id, 0)
        (again,) = await service.sample(state, parsed, 1, seed=7)
        assert (again.tokens, again.output) == (before.tokens, before.output)
        assert again.signature is None
        for who, step in ((owner, 5), (service.authenticate("someone-else"), 0)):
            with pytest.raises(ServiceError) as refused:
                await service.checkpoint_state(who, adapter.adapter_id, step)
            assert refused.value.status == 404

    try:
        asyncio.run(scenario())
    finally:
        close_app(app)
