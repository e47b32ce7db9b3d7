"""Helpers shared by the tests:

- ``serving``: the real local service app under uvicorn on 127.0.0.1, in a thread.
- ``Slow``: test-only ASGI middleware holding back a seeded fraction of responses.
- ``HideTrainSteps``: test-only ASGI middleware removing ``train_steps`` from answers of
  either dialect, to stand for a server that does not report it (Moondream's own
  ``/finetunes`` service does not).
- ``Recorder``: an ``httpx.MockTransport`` handler that remembers every request.
- Small samples, a reward that always varies, and a quiet ``Trainer`` (also one that
  saves a checkpoint when the run fails, and a fit over as many samples as its steps take).
- A box as the wire writes it, and a metric's results as plain floats.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import lightning as L
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from torch.utils.data import DataLoader
from torchmetrics import Metric

from lightning_moondream.api import Box
from lightning_moondream.data import DetectSample
from lightning_moondream.data.synthetic import detect_tasks, make_scene, split_seed
from lightning_moondream.server.middleware import HTTPMiddleware
from lightning_moondream.server.threaded import ThreadedServer

ASGIApp = Callable[..., Any]
Handler = Callable[[httpx.Request], httpx.Response]


def free_port() -> int:
    """A port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 in a thread; yield the API base URL."""
    with ThreadedServer(app) as server:
        yield server.url


class Recorder:
    """Answers requests from a handler and remembers each one."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    def bodies(self) -> list[Any]:
        """Each request's JSON body, ``None`` for one without a body."""
        return [
            json.loads(request.content) if request.content else None for request in self.requests
        ]


async def read_request(receive: Any) -> tuple[bytes, Callable[[], Any]]:
    """Read an ASGI request's whole body; give it and a ``receive`` replaying it to the app."""
    messages, body = [], b""
    while True:
        message = await receive()
        messages.append(message)
        body += message.get("body", b"")
        if not message.get("more_body"):
            break

    async def replay() -> Any:
        return messages.pop(0) if messages else await receive()

    return body, replay


def serve_command(port: int, data_dir: Path, *options: str) -> list[str]:
    """The command running ``serve`` on 127.0.0.1:``port`` with its data in ``data_dir``."""
    module = "lightning_moondream.server"
    return [
        sys.executable,
        "-m",
        module,
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        *options,
    ]


def wait_for_serve(process: subprocess.Popen[Any], url: str, key: str) -> httpx.Response:
    """Poll ``serve`` started in ``process`` until ``url`` answers; its first answer."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return httpx.get(url, headers={"X-Moondream-Auth": key})
        except httpx.TransportError:
            assert process.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)


class Slow:
    """Hold back a seeded fraction of responses for ``delay`` seconds after the app acted.

    The app handles the request first, so a slow answer never hides whether the state
    changed: a client that times out finds the change when it reads the adapter back.
    """

    def __init__(self, app: ASGIApp, rate: float, delay: float, seed: int = 0) -> None:
        self.app, self.rate, self.delay = app, rate, delay
        self._random = random.Random(seed)
        self.slowed = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self._random.random() >= self.rate:
            await self.app(scope, receive, send)
            return
        self.slowed += 1
        held: list[Any] = []

        async def hold(message: Any) -> None:
            held.append(message)

        await self.app(scope, receive, hold)
        await asyncio.sleep(self.delay)
        for message in held:
            await send(message)


class HideTrainSteps(HTTPMiddleware):
    """Remove ``train_steps`` from every JSON answer: a server that does not report it.

    An adapter carries it at the top of its answer or in a list of ``adapters``; a
    finetune, under ``finetune``.
    """

    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        start: dict[str, Any] = {}
        body = bytearray()

        async def rewrite(message: Any) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            content = bytes(body)
            try:
                data = json.loads(content)
            except ValueError:
                data = None
            if isinstance(data, dict):
                for item in [data, data.get("finetune") or {}, *(data.get("adapters") or [])]:
                    item.pop("train_steps", None)
                content = json.dumps(data).encode()
            headers = [
                (k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"
            ]
            headers.append((b"content-length", str(len(content)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": content})

        await self.app(scope, receive, rewrite)


def detect_samples(split: str, count: int, offset: int = 0) -> list[DetectSample]:
    """Detect samples over synthetic scenes, images kept in memory."""
    samples = []
    for index in range(offset, offset + count):
        scene = make_scene(split_seed(split, index))
        phrase, boxes = detect_tasks(scene)[0]
        samples.append(
            DetectSample(
                image=scene.image,
                object=phrase,
                boxes=tuple(Box(x_min=b[0], y_min=b[1], x_max=b[2], y_max=b[3]) for b in boxes),
                id=f"{split}-{index}",
                image_size=scene.image.size,
            )
        )
    return samples


def loader(samples: list[Any], batch_size: int = 2) -> DataLoader:
    """Batches as lists, in order."""
    return DataLoader(cast(Any, samples), batch_size=batch_size, collate_fn=list)


def alternating_reward() -> Callable[[Any, Any], float]:
    """A reward of 0, 1, 0, 1, ...: every group has spread, so every batch is a train step.

    The constant policy answers the same every time; this keeps its groups trainable.
    """
    counter = itertools.count()
    return lambda sample, rollout: float(next(counter) % 2)


def quiet_trainer(root: Path, **kwargs: Any) -> L.Trainer:
    """A ``Trainer`` without logger, progress bar, summary or validation by default."""
    options: dict[str, Any] = {
        "default_root_dir": root,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
        "devices": 1,
    }
    options.update(kwargs)
    return L.Trainer(**options)


def fit_on_detect_samples(
    model: L.LightningModule, root: Path, steps: int, batch_size: int = 2, **trainer_options: Any
) -> L.Trainer:
    """Fit ``model`` for ``steps`` steps over synthetic detect samples; the quiet ``Trainer``.

    There are as many batches of ``batch_size`` as the steps take: ``steps`` times the
    trainer's ``accumulate_grad_batches``.
    """
    batches = steps * trainer_options.get("accumulate_grad_batches", 1)
    trainer = quiet_trainer(root, max_steps=steps, **trainer_options)
    trainer.fit(model, loader(detect_samples("train", batches * batch_size), batch_size))
    return trainer


def on_exception_trainer(root: Path, max_steps: int) -> L.Trainer:
    """A quiet ``Trainer`` that saves ``root/ckpt/on_exception.ckpt`` when the run fails."""
    return quiet_trainer(
        root,
        max_steps=max_steps,
        enable_checkpointing=True,
        callbacks=[OnExceptionCheckpoint(dirpath=root / "ckpt")],
    )


_ALTERNATION = itertools.count()


def alternating(sample: Any, rollout: Any) -> float:
    """``alternating_reward`` as a plain function, for configs that name it by path."""
    return float(next(_ALTERNATION) % 2)


class SleepClock:
    """A clock that only moves when the code under test sleeps on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


def box(x_min: float, y_min: float, x_max: float, y_max: float) -> dict[str, float]:
    """A box as the wire writes it: normalized corners by name."""
    return {"x_min": x_min, "y_min": y_min, "x_max": x_max, "y_max": y_max}


def computed(metric: Metric) -> dict[str, float]:
    """What ``metric`` computes, each value as a float."""
    return {key: float(value) for key, value in metric.compute().items()}
