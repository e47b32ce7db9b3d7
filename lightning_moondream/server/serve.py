"""Command line of the local tuning service: ``python -m lightning_moondream.server``.

Serves the tuning API over HTTP with uvicorn, in the ``/adapters`` dialect, the
``/finetunes`` dialect or both (``--dialect``, default both). API keys come from ``--api-key``
(repeatable), else from ``MOONDREAM_API_KEY``; with neither, any non-empty key is
accepted and each key sees only its own adapters. Keys are never printed or logged. ``--rate-limit R`` limits each key to R requests per
second, in bursts of ``max(1, ceil(R / 5))`` (see ``rate_limit``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI

from lightning_moondream.images import DEFAULT_MAX_PIXELS
from lightning_moondream.server.app import DEFAULT_MAX_BODY_BYTES, DIALECTS, create_app
from lightning_moondream.server.engine import POLICIES
from lightning_moondream.server.faults import AFTER_APPLY_KINDS, ENDPOINTS, FAULT_KINDS, FaultConfig


def _latency(value: str) -> tuple[str, float]:
    name, sep, seconds = value.partition("=")
    if not sep or name not in ENDPOINTS:
        raise argparse.ArgumentTypeError(
            f"expected ENDPOINT=SECONDS with ENDPOINT in {', '.join(ENDPOINTS)}"
        )
    try:
        delay = float(seconds)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {seconds!r}") from exc
    if delay < 0:
        raise argparse.ArgumentTypeError("latency must not be negative")
    return name, delay


def _csv(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(value: str) -> tuple[str, ...]:
        items = tuple(item.strip() for item in value.split(",") if item.strip())
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)}"
            )
        return items

    return parse


_SERVICE_OPTIONS: dict[str, dict[str, Any]] = {
    "--host": {"default": "127.0.0.1", "help": "address to bind (default 127.0.0.1)"},
    "--port": {"type": int, "default": 8000, "help": "port to bind (default 8000)"},
    "--data-dir": {"help": "where adapters live (default: a temporary directory)"},
    "--api-key": {
        "action": "append",
        "help": "accepted API key, repeatable (default: MOONDREAM_API_KEY, else any key)",
    },
    "--policy": {"choices": POLICIES, "default": "reference", "help": "model behind the API"},
    "--dialect": {
        "choices": DIALECTS,
        "default": "both",
        "help": "API dialect(s) served: the spec's /adapters, the SDK's /finetunes, or both "
        "(default both, over one store)",
    },
    "--checkpoint-retention": {
        "type": float,
        "metavar": "SECONDS",
        "help": "seconds a checkpoint is kept, reported as expires_at_ms (default: for ever)",
    },
    "--seed": {"type": int, "default": 0, "help": "seed of sampling"},
    "--max-body-bytes": {"type": int, "default": DEFAULT_MAX_BODY_BYTES},
    "--max-pixels": {"type": int, "default": DEFAULT_MAX_PIXELS},
    "--threads": {"type": int, "default": 1, "help": "torch threads per request (default 1)"},
    "--rate-limit": {
        "type": float,
        "metavar": "R",
        "help": "requests per second per API key, in bursts of max(1, ceil(R/5)); over it, "
        "429 with Retry-After (default: no limit)",
    },
}
"""``serve``'s options of the service itself, with their ``add_argument`` settings."""

_FAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "--latency": {
        "type": _latency,
        "action": "append",
        "default": [],
        "metavar": "ENDPOINT=SECONDS",
        "help": f"least seconds to answer, repeatable; ENDPOINT in {', '.join(ENDPOINTS)}",
    },
    "--fault-rate": {"type": float, "default": 0.0, "help": "fraction of requests failed"},
    "--fault-kinds": {
        "type": _csv(FAULT_KINDS),
        "default": FAULT_KINDS,
        "help": "e.g. 429,503,500,drop",
    },
    "--fault-endpoints": {
        "type": _csv(ENDPOINTS),
        "default": ENDPOINTS,
        "help": "endpoints the fault rate applies to",
    },
    "--retry-after": {"type": int, "default": 1, "help": "Retry-After seconds of injected 429s"},
    "--fail-after-train-step": {
        "choices": AFTER_APPLY_KINDS,
        "help": "apply train steps, then answer 500 or drop the connection",
    },
    "--fail-after-train-step-rate": {"type": float, "default": 1.0},
    "--fault-seed": {"type": int, "default": 0, "help": "seed of the fault draws"},
}
"""``serve``'s options of injected latency and failures."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``serve``."""
    parser = argparse.ArgumentParser(
        prog="lightning-moondream serve",
        description="Serve the local tuning service (the tuning API with a small learning policy).",
    )
    for flag, settings in {**_SERVICE_OPTIONS, **_FAULT_OPTIONS}.items():
        parser.add_argument(flag, **settings)
    return parser


def app_from_args(
    args: argparse.Namespace,
    keys: list[str] | None,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """The app ``serve`` runs for its parsed arguments and the accepted keys.

    Args:
        args: ``build_parser``'s arguments.
        keys: Accepted API keys; ``None`` accepts any key.
        clock: Monotonic seconds the rate limit refills by.

    Raises:
        ValueError: For an option ``create_app`` or ``FaultConfig`` refuses.
    """
    faults = FaultConfig(
        rate=args.fault_rate,
        kinds=args.fault_kinds,
        endpoints=args.fault_endpoints,
        retry_after=args.retry_after,
        after_train_step=args.fail_after_train_step,
        after_train_step_rate=args.fail_after_train_step_rate,
        seed=args.fault_seed,
    )
    return create_app(
        data_dir=args.data_dir,
        api_keys=keys,
        policy=args.policy,
        latency=dict(args.latency),
        faults=faults,
        max_body_bytes=args.max_body_bytes,
        max_pixels=args.max_pixels,
        seed=args.seed,
        dialect=args.dialect,
        checkpoint_retention=args.checkpoint_retention,
        rate_limit=args.rate_limit,
        clock=clock,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments and serve until interrupted."""
    args = build_parser().parse_args(argv)
    keys = args.api_key or (
        [os.environ["MOONDREAM_API_KEY"]] if os.environ.get("MOONDREAM_API_KEY") else None
    )
    try:
        # One thread per request: requests run in parallel on the cores instead.
        torch.set_num_threads(max(1, args.threads))
        app = app_from_args(args, keys)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    if keys is None:
        print("no API key configured: any non-empty X-Moondream-Auth key is accepted", flush=True)
    else:
        print(f"{len(keys)} API key(s) configured", flush=True)
    if args.rate_limit is not None:
        print(f"rate limit: {args.rate_limit:g} requests per second per API key", flush=True)
    print(f"serving the tuning API at http://{args.host}:{args.port}/v1/tuning", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
