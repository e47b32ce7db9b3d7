"""Collectives between the processes of a distributed run, with timeouts and shared failures.

Under DDP one process (rank 0) owns the remote state: it opens the adapter, sends the
train step, saves API checkpoints, and tells the others what happened. Every process
samples and scores its own shard. :class:`Collective` carries the few messages this
needs (Python objects over a gloo group of its own, so each wait has a timeout), and
turns an error on any rank into an error on every rank, so no process waits for a peer
that has already given up.

Without an initialized process group (one process), every collective returns at once:
the same code runs in both cases.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch.distributed as dist

T = TypeVar("T")

DEFAULT_TIMEOUT = 1800.0
"""Seconds a process waits for its peers at a collective (Lightning's own default): long
enough for a train step on the service, short enough that a lost peer ends the run."""


class RankFailedError(RuntimeError):
    """Another process of the run failed; its error could not be raised here as it was.

    Attributes:
        rank: The global rank of the process that failed.
    """

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


@dataclass(frozen=True)
class Failure:
    """An error of one rank, in a form that crosses processes.

    Attributes:
        rank: Global rank of the process that raised it.
        kind: Name of the exception's type.
        message: The exception's text.
        pickled: The exception itself, pickled, when it can be (``None`` otherwise).
    """

    rank: int
    kind: str
    message: str
    pickled: bytes | None = None

    @classmethod
    def of(cls, error: BaseException, rank: int) -> Failure:
        """Describe ``error``, raised on ``rank``."""
        pickled: bytes | None
        try:
            pickled = pickle.dumps(error)
            pickle.loads(pickled)
        except Exception:
            # Exceptions with their own constructors do not always survive pickling;
            # their type and text still reach the other ranks.
            pickled = None
        return cls(rank=rank, kind=type(error).__name__, message=str(error), pickled=pickled)

    def error(self) -> BaseException:
        """The exception to raise on a rank other than ``rank``, naming the rank that failed."""
        note = f"raised on rank {self.rank}; every rank of the run stops with it"
        if self.pickled is not None:
            error: BaseException = pickle.loads(self.pickled)
            # Notes are shown under the traceback (Python 3.11+; older versions omit them).
            add_note = getattr(error, "add_note", None)
            if add_note is not None:
                add_note(note)
            return error
        return RankFailedError(
            f"rank {self.rank} failed with {self.kind}: {self.message}", self.rank
        )


class Collective:
    """Broadcast and gather of Python objects between the ranks of a run.

    Create it on every rank at the same point (``Collective.create()``, e.g. in a
    LightningModule's ``setup``): creating the group is itself a collective.

    Args:
        group: The process group to use, or ``None`` in a one-process run.
        rank: Global rank of this process.
        world_size: Number of processes.
    """

    def __init__(self, group: Any = None, rank: int = 0, world_size: int = 1) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def create(cls, timeout: float = DEFAULT_TIMEOUT) -> Collective:
        """A collective over every process of the initialized default group, if any.

        Args:
            timeout: Seconds each collective waits for the other ranks before failing.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        # A gloo group of its own: objects travel on the CPU whatever the backend of
        # training, and its timeout bounds every wait of these collectives.
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        return cls(group, dist.get_rank(), dist.get_world_size())

    @property
    def distributed(self) -> bool:
        """Whether there are other processes to talk to."""
        return self.world_size > 1

    @property
    def is_zero(self) -> bool:
        """Whether this is rank 0, the process that owns the remote state."""
        return self.rank == 0

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (the others pass anything, e.g. ``None``)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value``, in rank order, on rank 0; ``None`` on the others."""
        if not self.distributed:
            return [value]
        gathered: list[Any] | None = [None] * self.world_size if self.is_zero else None
        dist.gather_object(value, gathered, dst=0, group=self.group)
        return gathered

    def all_gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            dist.barrier(group=self.group)

    def check(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank brings an error; the lowest rank's wins.

        The rank that failed raises its own exception; the others raise it as it crossed
        the processes, with a note naming the rank (or a :class:`RankFailedError`).
        """
        failure = Failure.of(error, self.rank) if error is not None else None
        failures = [item for item in self.all_gather(failure) if item is not None]
        if failures:
            self._raise(failures[0], error)

    def on_zero(self, function: Callable[[], T]) -> T:
        """Run ``function`` on rank 0 and give its result, or its error, to every rank."""
        result: Any = None
        error: BaseException | None = None
        if self.is_zero:
            try:
                result = function()
            except Exception as exc:
                error = exc
        shared = self.broadcast(
            (result, None) if error is None else (None, Failure.of(error, self.rank))
        )
        value, failure = shared
        if failure is not None:
            self._raise(failure, error)
        return cast(T, value)

    def _raise(self, failure: Failure, own: BaseException | None) -> None:
        if failure.rank == self.rank and own is not None:
            raise own
        raise failure.error()
