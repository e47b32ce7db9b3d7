"""The API key stays secret, and the local service keeps keys, data and files apart.

The secrecy test runs ``serve --api-key`` and ``lightning-moondream fit`` as separate
processes over real HTTP, with injected faults so that retry warnings and error paths
run too, then scans everything they wrote and printed for the key.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from PIL import Image
from support import free_port, serving

from lightning_moondream.api import (
    AsyncTuningClient,
    AuthenticationError,
    RateLimitError,
    TuningClient,
)
from lightning_moondream.api.inprocess import InProcessTransport
from lightning_moondream.module import MoondreamRLModule
from lightning_moondream.server import create_app

TESTS = Path(__file__).parent
SECRET = "md-sk-9f8e7d6c5b4a-never-show-me"
URL = "http://local.invalid/v1/tuning"


def tiny_image(size: tuple[int, int] = (16, 16)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def wait_for_port(port: int, process: subprocess.Popen[str], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited: {process.stderr.read() if process.stderr else ''}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError("serve did not start listening")


CONFIG = """
seed_everything: 0
trainer:
  max_steps: 4
  default_root_dir: {root}
  log_every_n_steps: 1
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_moondream.callbacks.RemoteCheckpoint
      init_args: {{every_n_train_steps: 2, save_last: true}}
model:
  class_path: lightning_moondream.MoondreamRLModule
  init_args:
    name: secret-run
    num_rollouts: 2
    reward: support.alternating
    base_url: {url}
    max_retries: 8
    max_concurrency: 2
data:
  class_path: lightning_moondream.data.MoondreamDataModule
  init_args:
    train: {{source: synthetic, num_images: 8, skills: [detect]}}
    batch_size: 2
"""


@contextmanager
def served_with_key(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """``lightning-moondream serve --api-key SECRET`` with some faults; yields its URL and,
    once it has stopped, its output."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MOONDREAM_API_KEY", None)
    serve = subprocess.Popen(
        [sys.executable, "-m", "lightning_moondream.cli", "serve", "--port", str(port), "--api-key", SECRET,
         "--data-dir", str(tmp_path / "service"), "--policy", "constant", "--fault-rate", "0.1",
         "--retry-after", "0", "--fault-endpoints", "rollouts,train_step"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    outputs: list[str] = []
    try:
        wait_for_port(port, serve)
        yield f"http://127.0.0.1:{port}/v1/tuning", outputs
    finally:
        serve.terminate()
        outputs.extend(serve.communicate(timeout=60))


def scan_for_secret(root: Path, texts: list[str]) -> tuple[list[str], list[str]]:
    """Files under ``root`` and lines of ``texts`` that contain the key."""
    files = [
        str(path)
        for path in root.rglob("*")
        if path.is_file() and SECRET.encode() in path.read_bytes()
    ]
    lines = [line for text in texts for line in text.splitlines() if SECRET in line]
    return files, lines


def test_the_api_key_never_reaches_a_file_a_log_or_an_error(
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lightning_moondream.cli import main

    caplog.set_level(logging.DEBUG)
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.delenv("MOONDREAM_API_KEY", raising=False)
    monkeypatch.delenv("MOONDREAM_TUNING_URL", raising=False)
    run = tmp_path / "run"
    config = tmp_path / "config.yaml"
    errors: list[str] = []
    with served_with_key(tmp_path) as (url, served):
        config.write_text(CONFIG.format(root=run, url=url))
        # The key as a command-line argument (sys.argv as a shell would leave it) ...
        monkeypatch.setattr(sys, "argv", ["lightning-moondream"])
        main(["fit", "--config", str(config), "--model.init_args.api_key", SECRET])
        # ... and in the environment, for a run that fails on a request the server refuses.
        monkeypatch.setenv("MOONDREAM_API_KEY", SECRET)
        with pytest.raises(Exception) as raised:
            main(["fit", "--config", str(config), "--model.init_args.adapter_id", "ad_0123456789abcdef",
                  "--trainer.default_root_dir", str(run / "failed")])  # fmt: skip
        errors += [str(raised.value), repr(raised.value), raised.getrepr(style="long").__str__()]
        assert "not found" in str(raised.value)
    captured = capfd.readouterr()
    texts = [*served, captured.out, captured.err, caplog.text, *errors]
    texts += [str(record.args) for record in caplog.records]

    names = {path.name for path in tmp_path.rglob("*") if path.is_file()}
    # The run wrote what must be scanned: its config, hyperparameters, event logs,
    # checkpoints, and the service's database, secret and weight files.
    assert {"config.yaml", "hparams.yaml", "last.ckpt", "tuning.sqlite3"} <= names
    assert any(name.startswith("events.out.tfevents") for name in names)
    assert (
        "api_key: '**********'"
        in (run / "lightning_logs" / "version_0" / "config.yaml").read_text()
    )
    files, lines = scan_for_secret(tmp_path, texts)
    assert files == []
    assert lines == []


@pytest.mark.slow
def test_the_api_key_on_a_real_command_line_is_never_printed(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "PYTHONUNBUFFERED": "1"}
    env.pop("MOONDREAM_API_KEY", None)
    with served_with_key(tmp_path) as (url, served):
        config = tmp_path / "config.yaml"
        config.write_text(CONFIG.format(root=tmp_path / "run", url=url))
        fit = subprocess.run(
            [sys.executable, "-m", "lightning_moondream.cli", "fit", "--config", str(config),
             "--model.init_args.api_key", SECRET],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert fit.returncode == 0, fit.stderr[-3000:]
    files, lines = scan_for_secret(tmp_path, [*served, fit.stdout, fit.stderr])
    assert files == []
    assert lines == []


def local(app: Any, key: str | None) -> httpx.Client:
    headers = {"X-Moondream-Auth": key} if key is not None else {}
    return httpx.Client(transport=InProcessTransport(app), base_url=URL, headers=headers)


def test_errors_reprs_and_hparams_never_show_the_key() -> None:
    app = create_app(api_keys=["the-right-key"], policy="constant")
    http = httpx.Client(transport=InProcessTransport(app))
    client = TuningClient(api_key=SECRET, base_url=URL, http_client=http, max_retries=0)
    with pytest.raises(AuthenticationError) as raised:
        client.adapters.list()
    assert "invalid API key" in str(raised.value)
    # A server that echoes the key back in its message is scrubbed.
    echo = httpx.MockTransport(
        lambda request: httpx.Response(400, json={"error": {"message": f"bad key {SECRET}"}})
    )
    echoing = TuningClient(api_key=SECRET, base_url=URL, http_client=httpx.Client(transport=echo))
    with pytest.raises(Exception) as echoed:
        echoing.adapters.list()
    model = MoondreamRLModule(api_key=SECRET, base_url=URL)  # type: ignore[arg-type]
    texts = [
        str(raised.value), repr(raised.value), str(echoed.value), repr(client), repr(model),
        str(dict(model.hparams)), repr(model.client),
    ]  # fmt: skip
    assert "bad key" in str(echoed.value)
    assert all(SECRET not in text for text in texts)
    assert "api_key" not in model.hparams


def test_the_service_refuses_requests_without_a_valid_key() -> None:
    app = create_app(api_keys=["key-a"], policy="constant")
    for key in (None, "", "  ", "key-b", "key-a "):
        response = local(app, key).get("/adapters")
        assert response.status_code == 401, key
        assert response.json()["error"]["type"] == "authentication_error"


def test_one_keys_adapters_and_checkpoints_are_invisible_to_another() -> None:
    app = create_app(policy="constant")
    alice, bob = local(app, "alice"), local(app, "bob")
    adapter = alice.post("/adapters", json={"name": "private", "rank": 16}).json()["adapter_id"]
    checkpoint = alice.post(f"/adapters/{adapter}/checkpoint").json()["checkpoint_id"]
    short = checkpoint.split("/")[1]
    request = {"skill": "detect", "object": "dog", "image_url": tiny_image()}
    attempts = [
        bob.get(f"/adapters/{adapter}"),
        bob.get(f"/adapters/{adapter}/checkpoints"),
        bob.post(f"/adapters/{adapter}/checkpoint"),
        bob.post("/rollouts", json={"adapter_id": adapter, "num_rollouts": 1, "request": request}),
        bob.post("/train_step", json={"adapter_id": adapter, "groups": [
            {"request": request, "rollouts": [{"skill": "detect", "output": {}}], "rewards": [1.0]}]}),
        bob.post("/adapters", json={"name": "stolen", "rank": 16, "from_checkpoint": checkpoint}),
        bob.delete(f"/adapters/{adapter}/checkpoints/{short}"),
        bob.delete(f"/adapters/{adapter}"),
    ]  # fmt: skip
    assert [response.status_code for response in attempts] == [404] * len(attempts)
    # The answer is the same as for an id that never existed: nothing to probe.
    unknown = bob.get("/adapters/ad_00000000000000000000000000000000")
    assert unknown.status_code == 404
    assert bob.get("/adapters").json()["adapters"] == []
    assert alice.get(f"/adapters/{adapter}").status_code == 200
    assert (
        alice.get(f"/adapters/{adapter}/checkpoints").json()["checkpoints"][0]["checkpoint_id"]
        == checkpoint
    )


class Listener:
    """A TCP listener on 127.0.0.1 that counts connections (a would-be fetch target)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._stop = True
        self.thread.join()
        self.sock.close()


def test_the_service_fetches_nothing_but_inline_data_urls(tmp_path: Path) -> None:
    app = create_app(policy="constant")
    client = local(app, "key")
    adapter = client.post("/adapters", json={"name": "a", "rank": 16}).json()["adapter_id"]
    secret_file = tmp_path / "secret.jpg"
    Image.new("RGB", (16, 16)).save(secret_file)
    listener = Listener()
    try:
        urls = [
            f"http://127.0.0.1:{listener.port}/image.jpg",
            f"https://127.0.0.1:{listener.port}/image.jpg",
            f"ftp://127.0.0.1:{listener.port}/image.jpg",
            f"file://{secret_file}",
            str(secret_file),
            "../../../../etc/passwd",
            "data:text/plain;base64,aGVsbG8=",
            "data:image/jpeg;base64,not-base64!!",
        ]
        for url in urls:
            response = client.post("/rollouts", json={
                "adapter_id": adapter, "num_rollouts": 1,
                "request": {"skill": "detect", "object": "dog", "image_url": url}})  # fmt: skip
            assert response.status_code in (400, 422), url
            assert "request.image_url" in response.json()["error"]["message"], url
    finally:
        listener.close()
    assert listener.connections == 0


def test_body_and_pixel_limits() -> None:
    app = create_app(policy="constant", max_body_bytes=20_000, max_pixels=100 * 100)
    client = local(app, "key")
    adapter = client.post("/adapters", json={"name": "a", "rank": 16}).json()["adapter_id"]
    big = {
        "adapter_id": adapter,
        "num_rollouts": 1,
        "request": {"skill": "query", "question": "x" * 30_000},
    }
    response = client.post("/rollouts", json=big)
    assert response.status_code == 413
    assert "20000 bytes" in response.json()["error"]["message"]

    # Without a Content-Length (chunked), the limit holds while reading.
    def chunks() -> Any:
        for _ in range(30):
            yield b" " * 1000

    with serving(app) as url:
        streamed = httpx.post(
            f"{url}/rollouts",
            content=chunks(),
            headers={"X-Moondream-Auth": "key", "Content-Type": "application/json"},
        )
    assert streamed.status_code == 413
    assert "Content-Length" not in streamed.request.headers

    request = {"skill": "detect", "object": "dog", "image_url": tiny_image((101, 100))}
    response = client.post(
        "/rollouts", json={"adapter_id": adapter, "num_rollouts": 1, "request": request}
    )
    assert response.status_code == 400
    assert "10000" in response.json()["error"]["message"]
    request["image_url"] = tiny_image((100, 100))
    assert (
        client.post(
            "/rollouts", json={"adapter_id": adapter, "num_rollouts": 1, "request": request}
        ).status_code
        == 200
    )


def test_ids_and_cursors_cannot_reach_other_keys_or_the_file_system(tmp_path: Path) -> None:
    data_dir = tmp_path / "service"
    app = create_app(data_dir=data_dir, policy="constant")
    alice, bob = local(app, "alice"), local(app, "bob")
    for index in range(3):
        alice.post("/adapters", json={"name": f"a{index}", "rank": 16})
    mine = bob.post("/adapters", json={"name": "b", "rank": 16}).json()["adapter_id"]
    (tmp_path / "outside.pt").write_bytes(b"not yours")
    hostile = [
        "..", "../outside", "..%2Foutside", "%2e%2e%2f%2e%2e%2foutside", "../../etc/passwd",
        f"{mine}/../../outside", "adapters/../../outside", "*", "' OR '1'='1",
    ]  # fmt: skip
    for value in hostile:
        # Percent-encoded, so no client-side normalization removes the dot segments.
        segment = quote(value, safe="").replace(".", "%2E")
        for response in (
            bob.get(f"/adapters/{segment}"),
            bob.delete(f"/adapters/{segment}"),
            bob.post(f"/adapters/{segment}/checkpoint"),
            bob.delete(f"/adapters/{mine}/checkpoints/{segment}"),
            bob.post(
                "/adapters", json={"name": "x", "rank": 16, "from_checkpoint": f"{value}/chk_001"}
            ),
            bob.post("/adapters", json={"name": "x", "rank": 16, "from_checkpoint": value}),
        ):
            assert response.status_code in (400, 404, 405, 422), (
                value,
                response.status_code,
                response.text,
            )
    # Raw dot segments on the wire, as a hostile client would send them.
    with serving(app) as url:
        port = int(url.split(":")[2].split("/")[0])
        for path in (
            f"/v1/tuning/adapters/{mine}/../../../../outside",
            "/v1/tuning/adapters/../../etc/passwd",
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(
                    f"DELETE {path} HTTP/1.1\r\nHost: x\r\nX-Moondream-Auth: bob\r\nConnection: close\r\n\r\n".encode()
                )
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer.split(b" ")[1] in (b"400", b"404"), answer[:200]
    assert (tmp_path / "outside.pt").read_bytes() == b"not yours"
    assert bob.get(f"/adapters/{mine}").status_code == 200

    # Cursors are positions within the caller's own list: a forged or borrowed one
    # never shows another key's adapters, and a malformed one is refused.
    page = alice.get("/adapters", params={"limit": 1}).json()
    borrowed = bob.get("/adapters", params={"cursor": page["next_cursor"]}).json()
    forged = base64.urlsafe_b64encode(json.dumps({"after": 0}).encode()).decode().rstrip("=")
    everything = bob.get("/adapters", params={"cursor": forged, "limit": 100}).json()
    assert [item["adapter_id"] for item in everything["adapters"]] == [mine]
    assert all(item["adapter_id"] == mine for item in borrowed["adapters"])
    for cursor in (
        "../../etc/passwd",
        "%%%",
        base64.b64encode(b'{"after": -1}').decode(),
        "eyJhZnRlciI6ICJ4In0",
    ):
        response = bob.get("/adapters", params={"cursor": cursor})
        assert response.status_code == 400, cursor
        assert "cursor" in response.json()["error"]["message"]


def test_200_concurrent_rollouts_are_answered_or_refused_without_deadlock() -> None:
    app = create_app(policy="constant")
    request = {"skill": "detect", "object": "dog", "image_url": tiny_image()}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    async def storm(url: str) -> list[Any]:
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=200), timeout=60)
        async with AsyncTuningClient(
            api_key="key", base_url=url, http_client=http, max_retries=0
        ) as client:
            adapter = (await client.adapters.create("storm", 16)).adapter_id
            calls = [client.rollouts(adapter, request, 4) for _ in range(200)]
            results = await asyncio.wait_for(
                asyncio.gather(*calls, return_exceptions=True), timeout=120
            )
        await http.aclose()
        return results

    with serving(app) as url:
        results = asyncio.run(storm(url))
    answered = [result for result in results if not isinstance(result, BaseException)]
    refused = [result for result in results if isinstance(result, RateLimitError)]
    assert len(answered) + len(refused) == 200, [
        r for r in results if isinstance(r, BaseException)
    ][:3]
    assert all(len(result) == 4 for result in answered)
    assert answered
    # ru_maxrss is in KiB on Linux: 200 small requests must not cost hundreds of MiB.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300 * 1024
