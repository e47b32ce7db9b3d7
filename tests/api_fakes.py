"""Fakes of both wire dialects over ``httpx.MockTransport``, for client unit tests.

``FinetunesService`` speaks only the ``/finetunes`` wire as Moondream documents it;
``AdaptersService`` speaks only the spec's ``/adapters`` wire. Any other route answers
FastAPI's ``404 {"detail": "Not Found"}``, as a service without that route would.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from lightning_moondream.api import AsyncTuningClient, TuningClient
from lightning_moondream.api.limiter import RateLimiter

KEY = "sk-dialect-5ecret-key"
BASE = "https://tuning.example/v1/tuning"
DATA_URL = "data:image/jpeg;base64,/9j/AAAA"
BOX = {"x_min": 0.1, "y_min": 0.2, "x_max": 0.4, "y_max": 0.6}
NOT_FOUND_ROUTE = {"detail": "Not Found"}


def error(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": "not_found", "message": message}})


def _now_ms() -> int:
    return int(time.time() * 1000)


class Fake:
    """Remembers every request; subclasses answer them."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.fail_next: dict[tuple[str, str], str] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path.removeprefix("/v1/tuning")
        body = json.loads(request.content) if request.content else None
        failure = self.fail_next.pop((request.method, path), None)
        response = self.answer(request.method, path, body, dict(request.url.params))
        if failure == "drop":
            # The change is made, but the answer never arrives.
            raise httpx.ReadTimeout("timed out", request=request)
        if failure == "500":
            return httpx.Response(500, json={"error": {"type": "server", "message": "boom"}})
        return response

    def answer(
        self, method: str, path: str, body: Any, params: dict[str, str]
    ) -> httpx.Response:  # pragma: no cover - overridden
        raise NotImplementedError

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.path.removeprefix("/v1/tuning")) for r in self.requests]

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) if r.content else None for r in self.requests]


def _rollouts(body: dict[str, Any], id_field: str, boxes_field: str) -> dict[str, Any]:
    request = body["request"]
    rollout: dict[str, Any] = {
        "skill": request["skill"],
        "finish_reason": "stop",
        "answer_tokens": [1, 2],
        "thinking_tokens": [],
        "has_answer_separator": False,
        "coords": [],
        "sizes": [],
    }
    if request["skill"] == "query":
        rollout["output"] = {"answer": "a cat"}
        if request.get("reasoning"):
            rollout["output"]["reasoning"] = {
                "text": "it has whiskers",
                "grounding": [{"start_idx": 0, "end_idx": 2, "points": [[0.5, 0.5]]}],
            }
            rollout["thinking_tokens"] = [7, 8]
    elif request["skill"] == "detect":
        rollout["output"] = {boxes_field: [BOX]}
    else:
        rollout["output"] = {"points": [{"x": 0.2, "y": 0.3}]}
    answer: dict[str, Any] = {
        "request": request,
        "rollouts": [dict(rollout) for _ in range(body["num_rollouts"])],
    }
    assert id_field in body
    return answer


class FinetunesService(Fake):
    """The ``/finetunes`` wire of the Moondream SDK, and nothing else."""

    def __init__(self, *, wrap: bool = True) -> None:
        super().__init__()
        self.wrap = wrap
        self.finetunes: dict[str, dict[str, Any]] = {}
        self.checkpoints: dict[str, list[dict[str, Any]]] = {}
        self.metrics: list[dict[str, Any]] = []

    def answer(self, method: str, path: str, body: Any, params: dict[str, str]) -> httpx.Response:
        parts = path.strip("/").split("/")
        if method == "POST" and parts == ["finetunes"]:
            return self._create(body)
        if method == "GET" and parts == ["finetunes"]:
            return self._page("finetunes", list(self.finetunes.values()), params)
        if parts[0] == "finetunes" and len(parts) >= 2:
            finetune = self.finetunes.get(parts[1])
            if finetune is None:
                return error(404, f"finetune {parts[1]} not found")
            return self._finetune_route(method, parts[2:], finetune, body, params)
        if method == "POST" and parts == ["rollouts"]:
            if body.get("finetune_id") not in self.finetunes:
                return error(404, "finetune not found")
            return httpx.Response(200, json=_rollouts(body, "finetune_id", "objects"))
        if method == "POST" and parts == ["train_step"]:
            finetune = self.finetunes[body["finetune_id"]]
            finetune["train_steps"] += 1
            return httpx.Response(
                200,
                json={
                    "step": finetune["train_steps"],
                    "applied": True,
                    "kl": 0.01,
                    "router_kl": 0.0,
                    "grad_norm": 1.5,
                    "sft_loss": None,
                    "reward_mean": 0.5,
                    "reward_std": 0.25,
                },
            )
        return httpx.Response(404, json=NOT_FOUND_ROUTE)

    def _create(self, body: dict[str, Any]) -> httpx.Response:
        """Idempotent by name and rank; the same name with another rank is a conflict."""
        for finetune in self.finetunes.values():
            if finetune["name"] == body["name"]:
                if finetune["rank"] != body["rank"]:
                    return error(409, f"finetune {body['name']!r} exists with another rank")
                return httpx.Response(200, json={"finetune_id": finetune["finetune_id"]})
        finetune_id = f"ft_{len(self.finetunes) + 1}"
        now = _now_ms()
        self.finetunes[finetune_id] = {
            "finetune_id": finetune_id,
            "name": body["name"],
            "rank": body["rank"],
            "created_at_ms": now,
            "updated_at_ms": now,
            "train_steps": 0,
        }
        self.checkpoints[finetune_id] = []
        return httpx.Response(200, json={"finetune_id": finetune_id})

    @staticmethod
    def _page(field: str, items: list[dict[str, Any]], params: dict[str, str]) -> httpx.Response:
        start = int(params.get("cursor", 0))
        limit = int(params["limit"])
        more = start + limit < len(items)
        return httpx.Response(
            200,
            json={
                field: items[start : start + limit],
                "next_cursor": str(start + limit) if more else None,
                "has_more": more,
            },
        )

    def _finetune_route(
        self,
        method: str,
        rest: list[str],
        finetune: dict[str, Any],
        body: Any,
        params: dict[str, str],
    ) -> httpx.Response:
        finetune_id = finetune["finetune_id"]
        checkpoints = self.checkpoints[finetune_id]
        if method == "GET" and not rest:
            return httpx.Response(200, json={"finetune": finetune} if self.wrap else finetune)
        if method == "DELETE" and not rest:
            del self.finetunes[finetune_id]
            return httpx.Response(200, json={"ok": True})
        if method == "POST" and rest == ["metrics"]:
            for name, value in body["metrics"].items():
                self.metrics.append(
                    {"step": body["step"], "name": name, "value": value, "logged_at_ms": 1}
                )
            return httpx.Response(
                200, json={"ok": True, "step": body["step"], "logged_count": len(body["metrics"])}
            )
        if method == "GET" and rest == ["metrics"]:
            return httpx.Response(200, json={"metrics": self.metrics})
        if method == "POST" and rest == ["checkpoints", "save"]:
            now = _now_ms()
            checkpoint = {
                "checkpoint_id": f"ckpt_{len(checkpoints) + 1}",
                "finetune_id": finetune_id,
                "step": finetune["train_steps"],
                "expires_at_ms": now + 86_400_000,
                "created_at_ms": now,
                "updated_at_ms": now,
            }
            checkpoints.append(checkpoint)
            return httpx.Response(200, json={"ok": True, "checkpoint": checkpoint})
        if method == "GET" and rest == ["checkpoints"]:
            return self._page("checkpoints", checkpoints, params)
        if method == "DELETE" and len(rest) == 2 and rest[0] == "checkpoints":
            kept = [c for c in checkpoints if str(c["step"]) != rest[1]]
            if len(kept) == len(checkpoints):
                return error(404, "checkpoint not found")
            self.checkpoints[finetune_id] = kept
            return httpx.Response(200, json={"ok": True})
        return httpx.Response(404, json=NOT_FOUND_ROUTE)


class AdaptersService(Fake):
    """The spec's ``/adapters`` wire, and nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters: dict[str, dict[str, Any]] = {}
        self.checkpoints: list[dict[str, Any]] = []

    def answer(self, method: str, path: str, body: Any, params: dict[str, str]) -> httpx.Response:
        parts = path.strip("/").split("/")
        now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 1)) + "Z"
        if parts == ["adapters"] and method == "POST":
            adapter_id = f"ad_{len(self.adapters) + 1}"
            self.adapters[adapter_id] = {
                "adapter_id": adapter_id,
                "name": body["name"],
                "rank": body["rank"],
                "created_at": now,
                "train_steps": 0,
            }
            return httpx.Response(200, json={"adapter_id": adapter_id})
        if parts == ["adapters"] and method == "GET":
            return httpx.Response(
                200, json={"adapters": list(self.adapters.values()), "next_cursor": None}
            )
        if parts[0] == "adapters" and len(parts) >= 2:
            adapter = self.adapters.get(parts[1])
            if adapter is None:
                return error(404, f"adapter {parts[1]} not found")
            if method == "GET" and len(parts) == 2:
                return httpx.Response(200, json=adapter)
            if method == "POST" and parts[2:] == ["checkpoint"]:
                checkpoint = {
                    "checkpoint_id": f"{parts[1]}/chk_{len(self.checkpoints) + 1}",
                    "created_at": now,
                }
                self.checkpoints.append(checkpoint)
                return httpx.Response(200, json=checkpoint)
            if method == "GET" and parts[2:] == ["checkpoints"]:
                return httpx.Response(
                    200, json={"checkpoints": self.checkpoints, "next_cursor": None}
                )
        if parts == ["rollouts"] and method == "POST":
            return httpx.Response(200, json=_rollouts(body, "adapter_id", "boxes"))
        if parts == ["train_step"] and method == "POST":
            return httpx.Response(200, json={})
        return httpx.Response(404, json=NOT_FOUND_ROUTE)


def client_of(fake: Fake, dialect: str = "auto", **kwargs: Any) -> TuningClient:
    client = TuningClient(
        api_key=KEY,
        base_url=BASE,
        http_client=httpx.Client(transport=httpx.MockTransport(fake)),
        dialect=dialect,  # type: ignore[arg-type]
        rate_limiter=RateLimiter(),  # the key's pace in this process: none of other tests'
        **kwargs,
    )
    client._sleep = lambda seconds: None
    return client


def async_client_of(fake: Fake) -> AsyncTuningClient:
    """An ``AsyncTuningClient`` of ``fake`` that detects its dialect; open it with ``async with``."""
    return AsyncTuningClient(
        api_key=KEY,
        base_url=BASE,
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(fake)),
    )


def detect_group(client: TuningClient, finetune_id: str) -> dict[str, Any]:
    request = {"skill": "detect", "object": "cat", "image_url": DATA_URL}
    response = client.rollouts(finetune_id, request, 2)
    return dict(response.to_group([1.0, 0.0]))


SFT_QUERY = {
    "mode": "sft",
    "request": {"skill": "query", "question": "what is it?"},
    "target": {"answer": "a cat", "reasoning": "whiskers"},
}
