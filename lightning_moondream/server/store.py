"""Durable state of the local service: SQLite metadata plus one weight file per state.

Layout under the data directory::

    tuning.sqlite3              adapters, checkpoints and logged metrics (metadata)
    secret.key                  HMAC key signing rollouts and cursors (created once)
    adapters/<adapter_id>.pt    an adapter's current LoRA weights and optimizer state
    checkpoints/<adapter_id>/chk_NNN.pt

Deleted adapters, and the steps of deleted checkpoints, are remembered (ids only, their
files are removed at once), so that a delete sent again can be told from one of
something that never existed.

Every row carries its owner, a SHA-256 digest of the API key (the key itself is never
stored), and every query filters on it, so one key can never read, list or delete
another key's data. Ids are validated against their exact format before any path is
built from them, so no id can point outside the data directory.

One connection serves all threads behind a lock: SQLite work here is tiny, and a single
writer avoids ``database is locked`` errors under concurrent requests.
"""

from __future__ import annotations

import os
import re
import secrets
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

DATABASE_FILE = "tuning.sqlite3"
"""The store's metadata database, in its data directory."""

ADAPTER_ID = re.compile(r"[0-9a-f]{16}")
CHECKPOINT_SHORT_ID = re.compile(r"chk_[0-9]{3,9}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    adapter_id TEXT UNIQUE NOT NULL,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    rank INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    train_steps INTEGER NOT NULL DEFAULT 0,
    checkpoints_made INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS adapters_owner ON adapters (owner, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    checkpoint_id TEXT UNIQUE NOT NULL,
    adapter_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_adapter ON checkpoints (adapter_id, seq);
CREATE TABLE IF NOT EXISTS deleted_adapters (
    adapter_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deleted_checkpoints (
    adapter_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    owner TEXT NOT NULL,
    PRIMARY KEY (adapter_id, step)
);
CREATE TABLE IF NOT EXISTS metrics (
    adapter_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    logged_at_ms INTEGER NOT NULL,
    PRIMARY KEY (adapter_id, step, name)
);
"""

_ADDED_COLUMNS = {
    "adapters": {"updated_at_ms": "INTEGER"},
    "checkpoints": {"step": "INTEGER", "created_at_ms": "INTEGER", "expires_at_ms": "INTEGER"},
}
"""Columns later than the first schema, added to a data directory made before them."""


def now() -> str:
    """Current UTC time in the spec's format, e.g. ``2025-01-15T10:30:00Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_ms() -> int:
    """Current time in milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def to_ms(timestamp: str) -> int:
    """Milliseconds since the epoch of a ``now()`` timestamp."""
    moment = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def is_adapter_id(value: str) -> bool:
    """Tell whether ``value`` has the exact format of an adapter id."""
    return ADAPTER_ID.fullmatch(value) is not None


def parse_checkpoint_id(value: str) -> tuple[str, str] | None:
    """Split a full checkpoint id ``adapter_id/chk_NNN``, or ``None`` if malformed."""
    adapter_id, sep, short = value.partition("/")
    if sep and is_adapter_id(adapter_id) and CHECKPOINT_SHORT_ID.fullmatch(short):
        return adapter_id, short
    return None


@dataclass(frozen=True)
class AdapterRecord:
    """An adapter's metadata row."""

    seq: int
    adapter_id: str
    name: str
    rank: int
    created_at: str
    train_steps: int
    updated_at_ms: int | None = None

    @property
    def created_at_ms(self) -> int:
        """Creation time in milliseconds since the epoch."""
        return to_ms(self.created_at)

    def to_json(self) -> dict[str, Any]:
        """The spec's adapter JSON plus ``train_steps``."""
        return {
            "adapter_id": self.adapter_id,
            "name": self.name,
            "rank": self.rank,
            "created_at": self.created_at,
            "train_steps": self.train_steps,
        }


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint's metadata row.

    Attributes:
        step: Train steps of the adapter when saved (``None`` for rows made before
            steps were recorded).
        expires_at_ms: When the checkpoint expires, ``None`` for never.
    """

    seq: int
    checkpoint_id: str
    created_at: str
    step: int | None = None
    created_at_ms: int | None = None
    expires_at_ms: int | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> CheckpointRecord:
        """The record of a ``checkpoints`` row."""
        return cls(
            row["seq"],
            row["checkpoint_id"],
            row["created_at"],
            row["step"],
            row["created_at_ms"],
            row["expires_at_ms"],
        )

    def to_json(self) -> dict[str, Any]:
        """The spec's checkpoint JSON."""
        return {"checkpoint_id": self.checkpoint_id, "created_at": self.created_at}


def _write_atomically(path: Path, state: dict[str, Any]) -> None:
    # A crash mid-write must never leave a truncated weight file behind.
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class Store:
    """Adapters, checkpoints and their weight files under one data directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(root / DATABASE_FILE, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        with self._lock, self._db:
            self._db.executescript(_SCHEMA)
            for table, columns in _ADDED_COLUMNS.items():
                present = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
                for column, kind in columns.items():
                    if column not in present:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        self.secret = self._load_secret()

    def _load_secret(self) -> bytes:
        path = self.root / "secret.key"
        if not path.exists():
            # O_EXCL: two services starting on one directory cannot both write a key.
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return path.read_bytes()
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(secrets.token_bytes(32))
        return path.read_bytes()

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def _query_one(self, sql: str, params: tuple[Any, ...]) -> sqlite3.Row | None:
        """The first row a read-only query finds, or ``None``."""
        with self._lock:
            row: sqlite3.Row | None = self._db.execute(sql, params).fetchone()
        return row

    def _query_all(self, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
        """Every row a read-only query finds."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # Paths ---------------------------------------------------------------------------

    def adapter_path(self, adapter_id: str) -> Path:
        """Weight file of an adapter's current state."""
        if not is_adapter_id(adapter_id):
            raise ValueError(f"malformed adapter id {adapter_id!r}")
        return self.root / "adapters" / f"{adapter_id}.pt"

    def checkpoint_path(self, checkpoint_id: str) -> Path:
        """Weight file of a checkpoint."""
        parts = parse_checkpoint_id(checkpoint_id)
        if parts is None:
            raise ValueError(f"malformed checkpoint id {checkpoint_id!r}")
        return self.root / "checkpoints" / parts[0] / f"{parts[1]}.pt"

    @staticmethod
    def save_state(path: Path, state: dict[str, Any]) -> None:
        """Write a weight file atomically."""
        _write_atomically(path, state)

    @staticmethod
    def load_state(path: Path) -> dict[str, Any]:
        """Read a weight file (tensors and plain containers only)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold an adapter state")
        return state

    # Adapters ------------------------------------------------------------------------

    @staticmethod
    def _adapter(row: sqlite3.Row) -> AdapterRecord:
        return AdapterRecord(
            row["seq"],
            row["adapter_id"],
            row["name"],
            row["rank"],
            row["created_at"],
            row["train_steps"],
            row["updated_at_ms"],
        )

    def create_adapter(
        self, owner: str, name: str, rank: int, state: dict[str, Any]
    ) -> AdapterRecord:
        """Create an adapter with its initial weights; the weight file is written first."""
        adapter_id = secrets.token_hex(8)
        self.save_state(self.adapter_path(adapter_id), state)
        with self._lock, self._db:
            cursor = self._db.execute(
                "INSERT INTO adapters (adapter_id, owner, name, rank, created_at) VALUES (?, ?, ?, ?, ?)",
                (adapter_id, owner, name, rank, now()),
            )
            row = self._db.execute(
                "SELECT * FROM adapters WHERE seq = ?", (cursor.lastrowid,)
            ).fetchone()
        return self._adapter(row)

    def get_adapter(self, owner: str, adapter_id: str) -> AdapterRecord | None:
        """An adapter of this owner, or ``None`` (also for another owner's adapter)."""
        if not is_adapter_id(adapter_id):
            return None
        row = self._query_one(
            "SELECT * FROM adapters WHERE adapter_id = ? AND owner = ?", (adapter_id, owner)
        )
        return self._adapter(row) if row else None

    def find_adapter_named(self, owner: str, name: str) -> AdapterRecord | None:
        """The owner's oldest adapter of this name, or ``None``."""
        row = self._query_one(
            "SELECT * FROM adapters WHERE owner = ? AND name = ? ORDER BY seq LIMIT 1",
            (owner, name),
        )
        return self._adapter(row) if row else None

    def list_adapters(self, owner: str, limit: int, after: int) -> tuple[list[AdapterRecord], bool]:
        """Adapters of an owner created after position ``after``; and whether more follow."""
        rows = self._query_all(
            "SELECT * FROM adapters WHERE owner = ? AND seq > ? ORDER BY seq LIMIT ?",
            (owner, after, limit + 1),
        )
        return [self._adapter(row) for row in rows[:limit]], len(rows) > limit

    def delete_adapter(self, owner: str, adapter_id: str) -> bool:
        """Delete an adapter, its checkpoints and their files; ``False`` if not found."""
        if self.get_adapter(owner, adapter_id) is None:
            return False
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO deleted_adapters (adapter_id, owner) VALUES (?, ?)",
                (adapter_id, owner),
            )
            self._db.execute("DELETE FROM deleted_checkpoints WHERE adapter_id = ?", (adapter_id,))
            self._db.execute("DELETE FROM checkpoints WHERE adapter_id = ?", (adapter_id,))
            self._db.execute("DELETE FROM metrics WHERE adapter_id = ?", (adapter_id,))
            self._db.execute("DELETE FROM adapters WHERE adapter_id = ?", (adapter_id,))
        self.adapter_path(adapter_id).unlink(missing_ok=True)
        folder = self.root / "checkpoints" / adapter_id
        if folder.is_dir():
            for path in folder.iterdir():
                path.unlink(missing_ok=True)
            folder.rmdir()
        return True

    def was_deleted(self, owner: str, adapter_id: str) -> bool:
        """Whether this owner deleted an adapter of this id."""
        row = self._query_one(
            "SELECT 1 FROM deleted_adapters WHERE adapter_id = ? AND owner = ?", (adapter_id, owner)
        )
        return row is not None

    def record_train_step(self, adapter_id: str, state: dict[str, Any]) -> bool:
        """Persist an adapter's new state and count the step; ``False`` if it was deleted."""
        exists = self._query_one("SELECT 1 FROM adapters WHERE adapter_id = ?", (adapter_id,))
        if not exists:
            return False
        self.save_state(self.adapter_path(adapter_id), state)
        with self._lock, self._db:
            self._db.execute(
                "UPDATE adapters SET train_steps = train_steps + 1, updated_at_ms = ? "
                "WHERE adapter_id = ?",
                (now_ms(), adapter_id),
            )
        return True

    # Checkpoints ---------------------------------------------------------------------

    def create_checkpoint(
        self,
        owner: str,
        adapter_id: str,
        state: dict[str, Any],
        step: int | None = None,
        retention_ms: int | None = None,
    ) -> CheckpointRecord:
        """Save a checkpoint of an adapter's state under the next free number.

        Args:
            owner: The adapter's owner.
            adapter_id: The adapter.
            state: Its state to save.
            step: Its train steps at this state.
            retention_ms: How long the checkpoint is kept; ``None`` for ever.
        """
        with self._lock, self._db:
            self._db.execute(
                "UPDATE adapters SET checkpoints_made = checkpoints_made + 1 WHERE adapter_id = ?",
                (adapter_id,),
            )
            number = self._db.execute(
                "SELECT checkpoints_made FROM adapters WHERE adapter_id = ?", (adapter_id,)
            ).fetchone()[0]
        checkpoint_id = f"{adapter_id}/chk_{number:03d}"
        self.save_state(self.checkpoint_path(checkpoint_id), state)
        created_ms = now_ms()
        expires_ms = None if retention_ms is None else created_ms + retention_ms
        with self._lock, self._db:
            cursor = self._db.execute(
                "INSERT INTO checkpoints (checkpoint_id, adapter_id, owner, created_at, step, "
                "created_at_ms, expires_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (checkpoint_id, adapter_id, owner, now(), step, created_ms, expires_ms),
            )
            row = self._db.execute(
                "SELECT * FROM checkpoints WHERE seq = ?", (cursor.lastrowid,)
            ).fetchone()
        return CheckpointRecord.from_row(row)

    def get_checkpoint(self, owner: str, checkpoint_id: str) -> CheckpointRecord | None:
        """A checkpoint of this owner, or ``None``."""
        if parse_checkpoint_id(checkpoint_id) is None:
            return None
        row = self._query_one(
            "SELECT * FROM checkpoints WHERE checkpoint_id = ? AND owner = ?",
            (checkpoint_id, owner),
        )
        return CheckpointRecord.from_row(row) if row else None

    def list_checkpoints(
        self, owner: str, adapter_id: str, limit: int, after: int
    ) -> tuple[list[CheckpointRecord], bool]:
        """Checkpoints of an adapter created after position ``after``; and whether more follow."""
        rows = self._query_all(
            "SELECT * FROM checkpoints WHERE owner = ? AND adapter_id = ? AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (owner, adapter_id, after, limit + 1),
        )
        records = [CheckpointRecord.from_row(row) for row in rows]
        return records[:limit], len(rows) > limit

    def checkpoint_at_step(self, owner: str, adapter_id: str, step: int) -> CheckpointRecord | None:
        """The latest checkpoint of an adapter saved at train step ``step``, or ``None``."""
        row = self._query_one(
            "SELECT * FROM checkpoints WHERE owner = ? AND adapter_id = ? AND step = ? "
            "ORDER BY seq DESC LIMIT 1",
            (owner, adapter_id, step),
        )
        return CheckpointRecord.from_row(row) if row else None

    def delete_checkpoint(self, owner: str, checkpoint_id: str) -> bool:
        """Delete a checkpoint and its file; ``False`` if not found."""
        record = self.get_checkpoint(owner, checkpoint_id)
        if record is None:
            return False
        adapter_id = checkpoint_id.partition("/")[0]
        with self._lock, self._db:
            if record.step is not None:
                self._db.execute(
                    "INSERT OR IGNORE INTO deleted_checkpoints (adapter_id, step, owner) "
                    "VALUES (?, ?, ?)",
                    (adapter_id, record.step, owner),
                )
            self._db.execute("DELETE FROM checkpoints WHERE checkpoint_id = ?", (checkpoint_id,))
        self.checkpoint_path(checkpoint_id).unlink(missing_ok=True)
        return True

    def was_deleted_at_step(self, owner: str, adapter_id: str, step: int) -> bool:
        """Whether this owner deleted a checkpoint of this adapter saved at ``step``."""
        row = self._query_one(
            "SELECT 1 FROM deleted_checkpoints WHERE adapter_id = ? AND step = ? AND owner = ?",
            (adapter_id, step, owner),
        )
        return row is not None

    # Metrics -------------------------------------------------------------------------

    def log_metrics(self, adapter_id: str, step: int, metrics: dict[str, float]) -> int:
        """Store metrics of a step; a name logged again at the same step is replaced.

        Returns:
            How many metrics were stored.
        """
        logged_at = now_ms()
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO metrics (adapter_id, step, name, value, logged_at_ms) "
                "VALUES (?, ?, ?, ?, ?)",
                [(adapter_id, step, name, value, logged_at) for name, value in metrics.items()],
            )
        return len(metrics)

    def list_metrics(self, adapter_id: str) -> list[dict[str, Any]]:
        """Every metric logged for an adapter, by step then name."""
        rows = self._query_all(
            "SELECT step, name, value, logged_at_ms FROM metrics WHERE adapter_id = ? "
            "ORDER BY step, name",
            (adapter_id,),
        )
        return [dict(row) for row in rows]
