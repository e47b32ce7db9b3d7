"""Adapter states kept in memory, and the locks that serialize train steps."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from lightning_moondream.server.engine import AdapterState

CACHED_ADAPTERS = 64
"""Adapter states kept in memory; others are read from their weight files on use."""


class AdapterStates:
    """The current state of each adapter in use, with its train lock; thread-safe.

    A train step swaps in a complete new state when it ends (``remember``), so a reader
    never sees a half-updated adapter.

    Args:
        load: Reads an adapter's state from its weight file, on a cache miss.
    """

    def __init__(self, load: Callable[[str], AdapterState]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._states: OrderedDict[str, AdapterState] = OrderedDict()
        self._train_locks: dict[str, threading.Lock] = {}

    def get(self, adapter_id: str) -> AdapterState:
        """The adapter's current state (from memory, else from its weight file)."""
        with self._lock:
            state = self._states.get(adapter_id)
            if state is not None:
                self._states.move_to_end(adapter_id)
                return state
        state = self._load(adapter_id)
        self.remember(adapter_id, state)
        return state

    def remember(self, adapter_id: str, state: AdapterState) -> None:
        """Make ``state`` the adapter's current state in memory."""
        with self._lock:
            self._states[adapter_id] = state
            self._states.move_to_end(adapter_id)
            while len(self._states) > CACHED_ADAPTERS:
                self._states.popitem(last=False)

    def forget(self, adapter_id: str) -> None:
        """Drop a deleted adapter from memory."""
        with self._lock:
            self._states.pop(adapter_id, None)
            self._train_locks.pop(adapter_id, None)

    def train_lock(self, adapter_id: str) -> threading.Lock:
        """The lock serializing train steps of one adapter."""
        with self._lock:
            return self._train_locks.setdefault(adapter_id, threading.Lock())
