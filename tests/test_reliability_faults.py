"""Training runs and client calls over real HTTP against a faulty local service.

Every run here is a real ``MoondreamRLModule`` in a real ``Trainer`` (or a real
``TuningClient``), talking to the real app under uvicorn on 127.0.0.1. Every test runs
once per wire dialect (ids ``adapters`` and ``finetunes``), against a service serving that
dialect alone, so a client that strayed to the other wire would fail. The service's own
fault injection answers a seeded fraction of requests with 429 (``Retry-After: 0``), 503,
500 or a dropped connection, and can apply a train step then fail its answer; test-only
middleware adds answers slower than the client's timeout, hides ``train_steps`` and
loses the answers of creations and checkpoint saves. The invariant checked throughout:
the service's ``train_steps`` for the adapter equals what the trainer counted, so no step
was applied twice and none was lost.
"""

from __future__ import annotations

import asyncio
import random
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from support import (
    HideTrainSteps,
    Slow,
    alternating_reward,
    detect_samples,
    fit_on_detect_samples,
    loader,
    quiet_trainer,
    read_request,
    serving,
)

from lightning_moondream.api import (
    AmbiguousRequestError,
    ServerError,
    TuningClient,
)
from lightning_moondream.api.inprocess import InProcessTransport
from lightning_moondream.api.operations import DIALECTS, Dialect
from lightning_moondream.module import (
    CHECKPOINT_KEY,
    AmbiguousTrainStepError,
    MoondreamRLModule,
)
from lightning_moondream.server import create_app
from lightning_moondream.server.faults import DroppedConnection, FaultConfig, endpoint_of

KEY = "fault-test-key"


@pytest.fixture(params=DIALECTS)
def dialect(request: pytest.FixtureRequest) -> Dialect:
    """The wire dialect a test's service serves and its client speaks."""
    return request.param


def service(data_dir: Path, dialect: Dialect, faults: FaultConfig | None = None) -> Any:
    """The local service serving ``dialect`` alone, with the constant policy."""
    return create_app(
        data_dir=data_dir, api_keys=[KEY], policy="constant", dialect=dialect, faults=faults
    )


def direct_client(app: Any, dialect: Dialect) -> TuningClient:
    """A client of ``app`` in this process, around any middleware and without faults' reach
    on the wire (the app's own injection still applies)."""
    http = httpx.Client(transport=InProcessTransport(app))
    return TuningClient(
        api_key=KEY, base_url="http://local.invalid/v1/tuning", http_client=http, dialect=dialect
    )


def train_steps_of(data_dir: Path, adapter_id: str, dialect: Dialect) -> int:
    """The adapter's step count as the service stores it, read with faults off."""
    with direct_client(service(data_dir, dialect), dialect) as client:
        steps = client.adapters.get(adapter_id).train_steps
    assert steps is not None
    return steps


def new_adapter(data_dir: Path, name: str, dialect: Dialect) -> str:
    """Create the adapter the run trains, with faults off (creation is not under test)."""
    with direct_client(service(data_dir, dialect), dialect) as client:
        return client.adapters.create(name, 16).adapter_id


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """The folder of the test's service."""
    return tmp_path / "service"


@pytest.fixture
def adapter_id(data_dir: Path, dialect: Dialect) -> str:
    """The adapter the test's run trains, made before the faults are on."""
    return new_adapter(data_dir, "run", dialect)


def module(url: str, adapter_id: str | None, dialect: Dialect, **options: Any) -> MoondreamRLModule:
    """A module on ``url`` with short backoff, so faults cost milliseconds, not seconds."""
    settings: dict[str, Any] = {
        "api_key": KEY,
        "base_url": url,
        "adapter_id": adapter_id,
        "num_rollouts": 2,
        "dialect": dialect,
        "reward": alternating_reward(),
        "max_retries": 10,
        "max_concurrency": 4,
    }
    settings.update(options)
    model = MoondreamRLModule(**settings)
    model.client.retry_policy.base_delay = 0.005
    model.client.retry_policy.max_delay = 0.05
    return model


@contextmanager
def recorded_warnings() -> Iterator[list[str]]:
    """Messages of every warning, from any thread (the client runs on its own loop)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages: list[str] = []
        yield messages
        messages.extend(str(item.message) for item in caught)


def test_a_run_with_one_request_in_five_failing_applies_every_step_exactly_once(
    tmp_path: Path, data_dir: Path, adapter_id: str, dialect: Dialect
) -> None:
    app = service(
        data_dir,
        dialect,
        FaultConfig(
            rate=0.2,
            kinds=("429", "503", "500", "drop"),
            retry_after=0,
            after_train_step="drop",
            after_train_step_rate=0.2,
            seed=7,
        ),
    )
    slow = Slow(app, rate=0.04, delay=0.6, seed=3)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_last=True)
    with serving(slow) as url:
        model = module(url, adapter_id, dialect, timeout=0.3)
        trainer = fit_on_detect_samples(
            model, tmp_path, steps=30, enable_checkpointing=True, callbacks=[checkpoints]
        )

    assert trainer.global_step == 30
    assert train_steps_of(data_dir, adapter_id, dialect) == 30
    # The faults really happened: retries, answers slower than the timeout, and train
    # steps whose answer was lost after the server applied them (found by reading back).
    assert model.usage.retries > 0
    assert slow.slowed > 0
    assert model.usage.failures > 0
    # Periodic checkpoints survived the faults and point at API checkpoints that exist.
    import torch

    state = torch.load(checkpoints.last_model_path, weights_only=False)[CHECKPOINT_KEY]
    with direct_client(service(data_dir, dialect), dialect) as client:
        saved = [item.ref for item in client.checkpoints.iter(adapter_id)]
    assert state["checkpoint_id"] in saved
    assert state["train_steps"] == 30


AMBIGUOUS_FAULTS = {
    # Applied, then answered 500.
    "applied-then-500": FaultConfig(after_train_step="500"),
    # Applied, then the connection is dropped mid-answer.
    "applied-then-dropped": FaultConfig(after_train_step="drop"),
    # Dropped before anything happened: the step must be resent.
    "dropped-before": FaultConfig(rate=0.5, kinds=("drop",), endpoints=("train_step",), seed=1),
}


@pytest.mark.parametrize("fault", AMBIGUOUS_FAULTS)
def test_ambiguous_train_steps_are_resolved_by_reading_train_steps_back(
    tmp_path: Path, data_dir: Path, adapter_id: str, fault: str, dialect: Dialect
) -> None:
    app = service(data_dir, dialect, AMBIGUOUS_FAULTS[fault])
    with serving(app) as url, recorded_warnings() as messages:
        model = module(url, adapter_id, dialect)
        trainer = fit_on_detect_samples(model, tmp_path, steps=6)

    assert trainer.global_step == 6
    assert train_steps_of(data_dir, adapter_id, dialect) == 6
    resent = [
        message for message in messages if "was not applied" in message and "resending" in message
    ]
    if fault == "dropped-before":
        assert resent, "the seeded drops never hit a train step"
    else:
        # Every step was ambiguous (a failure was recorded for each) and none was resent.
        assert model.usage.failures >= 6
        assert resent == []


def first_failing_step(seed: int, rate: float) -> int:
    """Which train step (from 1) the service's seeded after-apply draw fails first."""
    draws = random.Random(seed)
    return next(step for step in range(1, 100) if draws.random() < rate)


def dropping_from_step_four(data_dir: Path, dialect: Dialect) -> tuple[str, Any]:
    """A new adapter, and a service that drops 30% of train step answers after applying
    them, the first at step 4 (so checkpoints exist before it)."""
    adapter_id = new_adapter(data_dir, "no-report", dialect)
    seed = next(seed for seed in range(1000) if first_failing_step(seed, 0.3) == 4)
    app = service(
        data_dir,
        dialect,
        FaultConfig(after_train_step="drop", after_train_step_rate=0.3, seed=seed),
    )
    return adapter_id, app


def test_ambiguous_step_without_train_steps_raises_with_a_checkpoint_to_resume_from(
    tmp_path: Path, data_dir: Path
) -> None:
    """On ``/adapters`` the run stops at a step of unknown outcome, and resuming from
    ``last.ckpt`` makes a new adapter from its API checkpoint and continues exactly.

    ``/finetunes`` answers every train step with the finetune's step, so there a step of
    unknown outcome is settled by the next answer instead (the next test).
    """
    dialect: Dialect = "adapters"
    adapter_id, app = dropping_from_step_four(data_dir, dialect)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    with serving(HideTrainSteps(app)) as url:
        model = module(url, adapter_id, dialect)
        trainer = quiet_trainer(
            tmp_path, max_steps=8, enable_checkpointing=True, callbacks=[checkpoints]
        )
        with pytest.raises(AmbiguousTrainStepError) as raised:
            trainer.fit(model, loader(detect_samples("train", 16), batch_size=2))

    last = tmp_path / "ckpt" / "last.ckpt"
    message = str(raised.value)
    assert "train step 4" in message
    assert "may or may not have been applied" in message
    assert "does not report train_steps" in message
    assert f"ckpt_path={str(last)!r}" in message
    assert "on_ambiguous_step='skip'" in message
    assert isinstance(raised.value.__cause__, AmbiguousRequestError)
    assert trainer.global_step == 3
    # The server applied step 4 before dropping its answer: the old adapter is one ahead,
    # which is why the run stops instead of guessing.
    assert train_steps_of(data_dir, adapter_id, dialect) == 4

    import torch

    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 3
    assert state[CHECKPOINT_KEY]["train_steps"] == 3
    with serving(service(data_dir, dialect)) as url:
        resumed = module(url, None, dialect)
        trainer = quiet_trainer(
            tmp_path,
            max_steps=8,
            enable_checkpointing=True,
            callbacks=[
                ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
            ],
        )
        batches = loader(detect_samples("train", 16), batch_size=2)
        # Resuming on a healthy service continues exactly from step 3, on a new adapter.
        trainer.fit(resumed, batches, ckpt_path=last)
        new_id = resumed.adapter.adapter_id
    assert trainer.global_step == 8
    assert new_id != adapter_id
    assert train_steps_of(data_dir, new_id, dialect) == 8 - 3


def test_on_finetunes_a_step_of_unknown_outcome_is_settled_by_the_next_answer(
    tmp_path: Path, data_dir: Path
) -> None:
    """Moondream Cloud's ``/finetunes`` does not report a finetune's step when read, but
    every train step's answer does: a step whose answer was lost is counted as applied
    (never resent, so never applied twice), and the next answer confirms the count."""
    dialect: Dialect = "finetunes"
    adapter_id, app = dropping_from_step_four(data_dir, dialect)
    with serving(HideTrainSteps(app)) as url, recorded_warnings() as messages:
        model = module(url, adapter_id, dialect)
        trainer = fit_on_detect_samples(model, tmp_path, steps=8)

    settled = [message for message in messages if "the next train step's answer" in message]
    assert "train step 4 may or may not have been applied" in settled[0]
    assert trainer.global_step == 8
    assert model.skipped_steps == 0
    assert train_steps_of(data_dir, adapter_id, dialect) == model.train_steps == 8


@pytest.mark.parametrize(
    ("fault", "applied"),
    [
        (FaultConfig(after_train_step="drop"), 5),
        (FaultConfig(after_train_step="500"), 5),
        (FaultConfig(rate=1.0, kinds=("drop",), endpoints=("train_step",)), 0),
    ],
    ids=["applied-then-dropped", "applied-then-500", "dropped-before"],
)
def test_skip_counts_an_unknown_step_as_applied_and_never_resends_it(
    tmp_path: Path,
    data_dir: Path,
    adapter_id: str,
    fault: FaultConfig,
    applied: int,
    dialect: Dialect,
) -> None:
    app = service(data_dir, dialect, fault)
    with serving(HideTrainSteps(app)) as url, recorded_warnings() as messages:
        model = module(url, adapter_id, dialect, on_ambiguous_step="skip")
        trainer = fit_on_detect_samples(model, tmp_path, steps=5)

    assert trainer.global_step == 5
    skipped = [message for message in messages if "counting it as applied" in message]
    assert len(skipped) == 5
    # Each step was sent once: applied once when the server acted, lost when it did not.
    assert train_steps_of(data_dir, adapter_id, dialect) == applied


class FailRollouts:
    """Answer 500 to every ``/rollouts`` request whose body holds ``marker``; count calls."""

    def __init__(self, app: Any, marker: bytes) -> None:
        self.app, self.marker = app, marker
        self.failed = 0
        self.train_steps = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body, replay = await read_request(receive)
        if scope["path"].endswith("/train_step"):
            self.train_steps += 1
        if scope["path"].endswith("/rollouts") and self.marker in body:
            self.failed += 1
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send(
                {
                    "type": "http.response.body",
                    "body": b'{"error": {"type": "api_error", "message": "boom"}}',
                }
            )
            return
        await self.app(scope, replay, send)


def test_one_failed_rollouts_request_fails_its_step_and_trains_on_nothing_partial(
    tmp_path: Path, data_dir: Path, adapter_id: str, dialect: Dialect
) -> None:
    from dataclasses import replace

    samples = detect_samples("train", 6)
    # The fourth sample (second batch) asks about an object only the middleware fails.
    samples[3] = replace(samples[3], object="poisoned object")
    app = FailRollouts(service(data_dir, dialect), b"poisoned object")
    with serving(app) as url:
        model = module(url, adapter_id, dialect, max_retries=3, max_concurrency=1)
        trainer = quiet_trainer(tmp_path, max_steps=3)
        with pytest.raises(ServerError) as raised:
            trainer.fit(model, loader(samples, batch_size=3))

    assert "POST /rollouts answered 500: boom" in str(raised.value)
    assert app.failed == 4  # the first attempt and its 3 retries
    assert trainer.global_step == 1
    assert app.train_steps == 1
    assert train_steps_of(data_dir, adapter_id, dialect) == 1


class AbandonFirstTrainStep:
    """Test-only ASGI wrapper: the client gives up on the first train step while it runs.

    The step goes on in the service (as when a client times out) and may only finish
    once the client has read the adapter back: when that read has answered, or is
    waiting for the step. The order is forced by events, not by timing.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.running = threading.Event()
        self.read_back = threading.Event()
        self.abandoned: asyncio.Task[None] | None = None
        service = app.state.service
        train, train_lock = service.engine.train, service.train_lock

        def slow_train(*args: Any) -> Any:
            self.running.set()
            assert self.read_back.wait(timeout=60), "the client never read the adapter back"
            return train(*args)

        outer = self

        class Watched:
            """The adapter's train lock, noting anyone who has to wait for it."""

            def __init__(self, lock: threading.Lock) -> None:
                self.lock = lock

            def __enter__(self) -> None:
                if self.lock.locked():
                    outer.read_back.set()
                self.lock.acquire()

            def __exit__(self, *exc_info: object) -> None:
                self.lock.release()

        service.engine.train = slow_train
        service.train_lock = lambda adapter_id: Watched(train_lock(adapter_id))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.endswith("/train_step") and self.abandoned is None:

            async def discard(message: Any) -> None:
                return None

            self.abandoned = asyncio.ensure_future(self.app(scope, receive, discard))
            assert await asyncio.to_thread(self.running.wait, 60), "the step never started"
            raise ConnectionAbortedError("the client stopped waiting")
        if self.abandoned is not None and scope["type"] == "http" and scope["method"] == "GET":

            async def answered(message: Any) -> None:
                await send(message)
                if message["type"] == "http.response.body":
                    self.read_back.set()

            await self.app(scope, receive, answered)
            return
        await self.app(scope, receive, send)


def test_a_step_still_running_when_the_client_gives_up_is_not_sent_again(
    tmp_path: Path, data_dir: Path, adapter_id: str, dialect: Dialect
) -> None:
    app = AbandonFirstTrainStep(service(data_dir, dialect))
    with serving(app) as url, recorded_warnings() as messages:
        model = module(url, adapter_id, dialect)
        trainer = fit_on_detect_samples(model, tmp_path, steps=3)

    assert app.abandoned is not None and app.read_back.is_set()
    # The read-back waited for the running step and found it applied: nothing resent.
    assert [message for message in messages if "resending" in message] == []
    assert trainer.global_step == 3
    assert train_steps_of(data_dir, adapter_id, dialect) == 3


class LoseAnswer:
    """Let the first ``POST`` to an endpoint group act, then drop its connection.

    The service has made its change when the answer is lost: the client cannot tell
    whether it did, the ambiguous case of a creation or a checkpoint save.
    """

    def __init__(self, app: Any, endpoint: str) -> None:
        self.app, self.endpoint = app, endpoint
        self.lost: list[int] = []
        """The status of each answer lost."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            self.lost
            or scope["type"] != "http"
            or scope["method"] != "POST"
            or endpoint_of(scope["path"]) != self.endpoint
        ):
            await self.app(scope, receive, send)
            return

        async def discard(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.lost.append(message["status"])

        await self.app(scope, receive, discard)
        # Started then failed, the answer is cut short by uvicorn (a clean 500 otherwise).
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        raise DroppedConnection("the answer was lost after the service acted")


def test_an_adapter_creation_whose_answer_is_lost_is_found_by_listing(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The service made the adapter, then the connection dropped; it is never made twice.

    ``/adapters`` lists adapters, so the client finds the one it made and returns it.
    (``/finetunes`` creation is idempotent by name and rank: the client sends it again.)
    """
    app = LoseAnswer(service(data_dir, "adapters"), "adapters")
    with (
        serving(app) as url,
        TuningClient(api_key=KEY, base_url=url, dialect="adapters") as client,
    ):
        created = client.adapters.create("lost-answer", 16).adapter_id
        assert f"it had created adapter {created}, which is used" in caplog.text
    assert app.lost == [200]
    # The store as /adapters lists it: the one adapter the one request made.
    with direct_client(service(data_dir, "adapters"), "adapters") as reader:
        made = list(reader.adapters.iter())
    assert [(adapter.name, adapter.rank) for adapter in made] == [("lost-answer", 16)]
    assert made[0].adapter_id == created


def test_a_finetune_creation_whose_answer_is_lost_is_sent_again_and_made_once(
    data_dir: Path,
) -> None:
    """``POST /finetunes`` is idempotent by name and rank: resending it names the same one."""
    app = LoseAnswer(service(data_dir, "finetunes"), "adapters")
    with (
        serving(app) as url,
        TuningClient(api_key=KEY, base_url=url, dialect="finetunes") as client,
    ):
        created = client.adapters.create("lost-answer", 8)
        listed = list(client.adapters.iter())
    assert app.lost == [200]
    assert [(item.adapter_id, item.name, item.rank) for item in listed] == [
        (created.adapter_id, "lost-answer", 8)
    ]


def test_a_checkpoint_save_whose_answer_is_lost_is_resolved_by_listing(
    data_dir: Path, adapter_id: str, dialect: Dialect
) -> None:
    app = LoseAnswer(service(data_dir, dialect), "checkpoints")
    with (
        serving(app) as url,
        TuningClient(api_key=KEY, base_url=url, dialect=dialect) as client,
    ):
        saved = client.checkpoints.save(adapter_id)
        listed = [item.ref for item in client.checkpoints.iter(adapter_id)]
    assert app.lost == [200]
    # The checkpoint the lost answer named, and no second one.
    assert listed == [saved.ref]
    assert saved.adapter_id == adapter_id
