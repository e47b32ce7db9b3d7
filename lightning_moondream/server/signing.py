"""Signatures that bind each rollout to the adapter and request it was sampled for.

A rollout's training metadata (sampled tokens and their log-probabilities) comes back
to ``/train_step`` from the client. An HMAC over the adapter id, a digest of the echoed
request, the tokens and the log-probabilities, keyed by a secret kept in the data
directory (so signatures survive restarts), lets the service refuse metadata that was
edited, or that belongs to another adapter, request or service.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from typing import Any


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes of a value (sorted keys, no spaces)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def request_digest(request: Mapping[str, Any]) -> str:
    """SHA-256 of a request's canonical JSON."""
    return hashlib.sha256(canonical_json(request)).hexdigest()


def sign_rollout(
    secret: bytes,
    adapter_id: str,
    digest: str,
    tokens: Sequence[int],
    logprobs: Sequence[float],
) -> str:
    """Hex HMAC-SHA256 of a rollout's training metadata."""
    message = canonical_json([adapter_id, digest, list(tokens), list(logprobs)])
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def verify_rollout(
    secret: bytes,
    adapter_id: str,
    digest: str,
    tokens: Sequence[int],
    logprobs: Sequence[float],
    signature: str,
) -> bool:
    """Tell whether ``signature`` is the rollout's signature (constant-time compare)."""
    return hmac.compare_digest(
        sign_rollout(secret, adapter_id, digest, tokens, logprobs), signature
    )
