"""Plans: each client call written once, as a generator both clients drive.

A call of the tuning API may take several requests: finding which dialect the service
speaks, then the call itself, then, when its outcome is unknown, a lookup that settles
it. Written as ordinary code, that logic would exist twice, once blocking and once with
``await``. It is written once here instead, as a *plan*: a generator that yields each
``Operation`` it needs sent and receives its result.

- ``ClientCore._steps`` takes each yielded operation, sends it (with retries, as steps
  that the client's blocking or async driver carries out, see ``drivers``), and resumes
  the plan with ``plan.send(result)``, or with ``plan.throw(error)`` when the operation
  failed for good, so the plan can catch the error like any other (a missing route, an
  unknown outcome).
- The plan's ``return`` value is the call's result (``StopIteration.value``).
- A plan never does I/O and never sleeps itself: blocking or not is the driver's
  business, so the synchronous and asynchronous clients follow the same steps exactly,
  and a test of one is a test of the other's logic.

Two rules live here and nowhere else:

- Dialect negotiation (``DialectNegotiation``). A client decides its dialect once, at
  its first call, and keeps it. On ``auto`` the first call sends its own first request in
  each dialect in turn (``/finetunes``, then ``/adapters``) until one has the route; only
  requests that a missing route refuses without acting are sent this way (reading an
  adapter, listing, creating). The dialect is decided by that request's success, before
  anything else of the call is built, and every later request of the call and of the
  client uses it. Only a checkpoint's own id can name another dialect, for the call that
  uses it: ``adapter_id/chk_id`` is an ``/adapters`` checkpoint and ``finetune_id@step``
  a ``/finetunes`` one (creating from one on ``auto``, deleting one).
- Recovery of unknown outcomes. A state-changing request whose answer is lost may or may
  not have acted. A creation on ``/finetunes`` is idempotent by name and rank, so it is
  simply sent again (see ``operations.create_adapter``); a creation on ``/adapters`` and a
  checkpoint save are settled by listing what was made since the request started.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, TypeVar, get_args

from lightning_moondream.api import operations as ops
from lightning_moondream.api.errors import (
    AmbiguousRequestError,
    ConflictError,
    NotFoundError,
    TuningAPIError,
)
from lightning_moondream.api.models import (
    Adapter,
    AdapterPage,
    Checkpoint,
    CheckpointPage,
    RolloutsResponse,
    TrainStepResult,
)
from lightning_moondream.api.operations import Dialect

T = TypeVar("T")
Plan = Generator["ops.Operation[Any]", Any, T]
"""A call that may take several requests: yields operations, receives their results."""
DialectChoice = Literal["auto", "adapters", "finetunes"]

CLOCK_SLACK = timedelta(seconds=5)
"""How far the server's clock may run behind ours when matching what a request created."""
MISSING_ROUTE_STATUSES = (404, 405)
NEGOTIATION_ORDER: tuple[Dialect, ...] = ("finetunes", "adapters")
"""Moondream Cloud documents ``/finetunes``, so it is asked first."""
LOOKUP_PAGE_SIZE = 100

logger = logging.getLogger(__name__)


def check_dialect(dialect: str) -> None:
    """Refuse a dialect name that is not ``auto``, ``adapters`` or ``finetunes``.

    Raises:
        ValueError: Naming the choices and the name given.
    """
    if dialect not in get_args(DialectChoice):
        raise ValueError(
            f"dialect must be one of {', '.join(get_args(DialectChoice))}, got {dialect!r}"
        )


@dataclass(frozen=True)
class RolloutCall:
    """One ``/rollouts`` request for ``rollouts_many``."""

    adapter_id: str
    request: ops.RequestInput
    num_rollouts: int
    ground_truth: ops.GroundTruthInput = None

    def checked(self) -> ops.CheckedRollouts:
        """The call checked, before any dialect is involved."""
        return ops.check_rollouts(
            self.adapter_id, self.request, self.num_rollouts, self.ground_truth
        )

    def operation(self, dialect: Dialect = "finetunes") -> ops.Operation[RolloutsResponse]:
        """Check the call and build its operation for a dialect."""
        return self.checked().operation(dialect)


def one(operation: ops.Operation[T]) -> Plan[T]:
    """The plan of a call made of one request."""
    return (yield operation)


class DialectNegotiation:
    """The dialect a client speaks: as given, or decided once by its first call.

    Args:
        choice: ``"adapters"``, ``"finetunes"`` or ``"auto"``.
        base_url: Named in the one log line that says what was decided.
    """

    def __init__(self, choice: DialectChoice, base_url: str) -> None:
        check_dialect(choice)
        self.choice = choice
        self.dialect: Dialect | None = None if choice == "auto" else choice
        """The dialect spoken, or ``None`` before an ``auto`` client's first success."""
        self._base_url = base_url

    def decide(self, dialect: Dialect) -> Dialect:
        """Settle on a dialect, unless one already is (the first decision stays)."""
        if self.dialect is None:
            self.dialect = dialect
            logger.info("the tuning API at %s speaks the /%s dialect", self._base_url, dialect)
        return self.dialect

    def negotiate(
        self,
        first: Callable[[Dialect], Plan[T]],
        order: Sequence[Dialect] = NEGOTIATION_ORDER,
        on_missing: Callable[[list[TuningAPIError]], TuningAPIError] | None = None,
    ) -> Plan[tuple[Dialect, T]]:
        """Run a call's first step in each dialect in turn; the first with the route wins.

        Args:
            first: The call's first step in a dialect: a request that a missing route
                refuses without acting.
            order: The dialects to try.
            on_missing: The error when no dialect has the route; by default the last
                answer's.

        Returns:
            The dialect decided and the step's result.
        """
        missing: list[TuningAPIError] = []
        for dialect in order:
            try:
                result = yield from first(dialect)
            except TuningAPIError as exc:
                if exc.status_code not in MISSING_ROUTE_STATUSES:
                    raise
                missing.append(exc)
                continue
            return self.decide(dialect), result
        raise on_missing(missing) if on_missing else missing[-1]


class Plans:
    """Every call of the tuning API as a plan, for a client's dialect negotiation.

    Args:
        negotiation: The client's dialect.
        scrub: Removes the API key from a text.
    """

    def __init__(self, negotiation: DialectNegotiation, scrub: Callable[[str], str]) -> None:
        self.negotiation = negotiation
        self._scrub = scrub

    # Finding the dialect ---------------------------------------------------------------

    def _attach(self, adapter_id: str) -> Plan[tuple[Dialect, Adapter]]:
        """Read an adapter, deciding the dialect from it on ``auto``.

        A 404 means either a missing route or a missing adapter, so only a success
        decides: an id missing in both dialects leaves the dialect undecided.
        """
        decided = self.negotiation.dialect
        if decided is not None:
            return decided, (yield ops.get_adapter(adapter_id, dialect=decided))

        def not_found(missing: list[TuningAPIError]) -> TuningAPIError:
            answers = "; ".join(
                f"GET /{dialect}/... answered {exc.status_code}"
                for dialect, exc in zip(NEGOTIATION_ORDER, missing, strict=False)
            )
            message = f"adapter {adapter_id!r} not found in either dialect ({answers})"
            return NotFoundError(self._scrub(message), status_code=404)

        return (
            yield from self.negotiation.negotiate(
                lambda dialect: one(ops.get_adapter(adapter_id, dialect=dialect)),
                on_missing=not_found,
            )
        )

    def _dialect_for(self, adapter_id: str) -> Plan[Dialect]:
        """The dialect to address an adapter in: decided, or found by reading it."""
        if self.negotiation.dialect is not None:
            return self.negotiation.dialect
        dialect, _ = yield from self._attach(adapter_id)
        return dialect

    # Adapters --------------------------------------------------------------------------

    def get_adapter(self, adapter_id: str) -> Plan[Adapter]:
        """Describe one adapter; on ``auto`` this is how the dialect is found."""
        _, adapter = yield from self._attach(adapter_id)
        return adapter

    def create_adapter(self, name: str, rank: int, from_checkpoint: str | None) -> Plan[Adapter]:
        """Create an adapter; the rank is checked against the dialect it is sent in."""
        ops.check_name(name)
        if from_checkpoint is not None and self.negotiation.choice == "auto":
            # The checkpoint id (adapter_id/chk_id) says /adapters, as it does for
            # deleting one; a service without that route answers 404 and makes nothing.
            _, adapter = yield from self.negotiation.negotiate(
                lambda dialect: self._create_in(dialect, name, rank, from_checkpoint),
                order=("adapters",),
            )
            return adapter
        decided = self.negotiation.dialect
        if decided is not None:
            return (yield from self._create_in(decided, name, rank, from_checkpoint))
        _, adapter = yield from self.negotiation.negotiate(
            lambda dialect: self._create_in(dialect, name, rank, None)
        )
        return adapter

    def _create_in(
        self, dialect: Dialect, name: str, rank: int, from_checkpoint: str | None
    ) -> Plan[Adapter]:
        operation = ops.create_adapter(name, rank, from_checkpoint, dialect=dialect)
        started = datetime.now(timezone.utc)
        try:
            return (yield operation)
        except ConflictError as exc:
            if dialect != "finetunes":
                raise
            raise ConflictError(
                self._scrub(
                    f"a finetune named {name!r} already exists with a rank other than {rank}: "
                    f"choose another name ({exc.message})"
                ),
                status_code=exc.status_code,
                request_id=exc.request_id,
            ) from exc
        except AmbiguousRequestError as exc:
            return (yield from self._recover_creation(exc, name, rank, started))

    def list_adapters(self, limit: int, cursor: str | None) -> Plan[AdapterPage]:
        """One page of adapters (finetunes)."""
        decided = self.negotiation.dialect
        if decided is not None:
            return (yield ops.list_adapters(limit, cursor, dialect=decided))
        _, page = yield from self.negotiation.negotiate(
            lambda dialect: one(ops.list_adapters(limit, cursor, dialect=dialect))
        )
        return page

    def delete_adapter(self, adapter_id: str) -> Plan[None]:
        """Delete an adapter and its checkpoints."""
        dialect = yield from self._dialect_for(adapter_id)
        yield ops.delete_adapter(adapter_id, dialect=dialect)

    # Checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self, adapter_id: str) -> Plan[Checkpoint]:
        """Save a checkpoint; an unknown outcome is settled by listing checkpoints."""
        dialect = yield from self._dialect_for(adapter_id)
        operation = ops.save_checkpoint(adapter_id, dialect=dialect)
        started = datetime.now(timezone.utc)
        try:
            return (yield operation)
        except AmbiguousRequestError as exc:
            return (yield from self._recover_save(exc, adapter_id, dialect, started))

    def list_checkpoints(
        self, adapter_id: str, limit: int, cursor: str | None
    ) -> Plan[CheckpointPage]:
        """One page of an adapter's checkpoints."""
        dialect = yield from self._dialect_for(adapter_id)
        return (yield ops.list_checkpoints(adapter_id, limit, cursor, dialect=dialect))

    # Training --------------------------------------------------------------------------

    def rollouts(
        self,
        adapter_id: str,
        request: ops.RequestInput,
        num_rollouts: int,
        ground_truth: ops.GroundTruthInput,
    ) -> Plan[RolloutsResponse]:
        """Sample rollouts; invalid input fails before any request, negotiation included."""
        checked = ops.check_rollouts(adapter_id, request, num_rollouts, ground_truth)
        dialect = yield from self._dialect_for(adapter_id)
        return (yield checked.operation(dialect))

    def rollouts_operations(
        self, calls: Iterable[RolloutCall]
    ) -> Plan[list[ops.Operation[RolloutsResponse]]]:
        """The operations of many rollouts calls, all checked before any is sent."""
        checked = [call.checked() for call in calls]
        if not checked:
            return []
        dialect = yield from self._dialect_for(checked[0].adapter_id)
        return [call.operation(dialect) for call in checked]

    def train_step(
        self,
        adapter_id: str,
        groups: Sequence[Mapping[str, Any]],
        lr: float | None,
        extra: Mapping[str, Any],
    ) -> Plan[TrainStepResult]:
        """Apply one train step, never repeated when its outcome is unknown."""
        checked = ops.check_train_step(adapter_id, groups, lr, extra)
        dialect = yield from self._dialect_for(adapter_id)
        return (yield checked.operation(dialect))

    def log_metrics(self, adapter_id: str, step: int, metrics: Mapping[str, float]) -> Plan[int]:
        """Log the metrics of a step (``/finetunes``)."""
        checked = ops.check_metrics(step, metrics)
        dialect = yield from self._dialect_for(adapter_id)
        return (yield checked.operation(adapter_id, dialect))

    def read_metrics(self, adapter_id: str) -> Plan[list[dict[str, Any]]]:
        """Every logged metric (the local service's extension of ``/finetunes``)."""
        dialect = yield from self._dialect_for(adapter_id)
        return (yield ops.read_metrics(adapter_id, dialect=dialect))

    # Recovery of unknown outcomes ------------------------------------------------------

    def _lookup(self, ambiguous: AmbiguousRequestError, lookup: Plan[T], what: str) -> Plan[T]:
        """Run a lookup that settles an unknown outcome; its failure keeps it unknown."""
        try:
            return (yield from lookup)
        except TuningAPIError as failure:
            raise AmbiguousRequestError(
                ambiguous.operation,
                ambiguous.cause,
                facts=f"{what} failed too ({failure.message})",
            ) from ambiguous

    def _recover_creation(
        self, ambiguous: AmbiguousRequestError, name: str, rank: int, started: datetime
    ) -> Plan[Adapter]:
        """Find the one ``/adapters`` adapter an unknown creation made, or stay unknown."""
        found = yield from self._lookup(
            ambiguous,
            self._adapters_made(name, rank, started),
            f"looking for the adapter named {name!r}",
        )
        if len(found) != 1:
            ids = f": {', '.join(a.adapter_id for a in found)}" if found else ""
            raise AmbiguousRequestError(
                ambiguous.operation,
                ambiguous.cause,
                facts=f"{len(found)} adapters named {name!r} with rank {rank} were created "
                f"after {started.isoformat()}{ids}",
            ) from ambiguous
        logger.warning(
            "%s had an unknown outcome; it had created adapter %s, which is used",
            ambiguous.operation,
            found[0].adapter_id,
        )
        return found[0]

    def _adapters_made(self, name: str, rank: int, started: datetime) -> Plan[list[Adapter]]:
        found: list[Adapter] = []
        cursor = None
        while True:
            page = yield ops.list_adapters(LOOKUP_PAGE_SIZE, cursor, dialect="adapters")
            found += [
                adapter
                for adapter in page.items
                if adapter.name == name
                and adapter.rank == rank
                and adapter.created_after(started - CLOCK_SLACK)
            ]
            if not page.next_cursor:
                return found
            cursor = page.next_cursor

    def _recover_save(
        self,
        ambiguous: AmbiguousRequestError,
        adapter_id: str,
        dialect: Dialect,
        started: datetime,
    ) -> Plan[Checkpoint]:
        """Return the newest checkpoint made since an unknown save, or stay unknown."""
        found = yield from self._lookup(
            ambiguous,
            self._checkpoints_made(adapter_id, dialect, started),
            f"listing the checkpoints of {adapter_id}",
        )
        if not found:
            raise AmbiguousRequestError(
                ambiguous.operation,
                ambiguous.cause,
                facts=f"no checkpoint of {adapter_id} was created after {started.isoformat()}",
            ) from ambiguous
        newest = found[-1]
        logger.warning(
            "%s had an unknown outcome; it had saved checkpoint %s, which is returned",
            ambiguous.operation,
            newest.ref,
        )
        return newest

    def _checkpoints_made(
        self, adapter_id: str, dialect: Dialect, started: datetime
    ) -> Plan[list[Checkpoint]]:
        found: list[Checkpoint] = []
        cursor = None
        while True:
            page = yield ops.list_checkpoints(adapter_id, LOOKUP_PAGE_SIZE, cursor, dialect=dialect)
            found += [item for item in page.items if item.created_after(started - CLOCK_SLACK)]
            if not page.next_cursor:
                break
            cursor = page.next_cursor
        return sorted(
            found, key=lambda item: (item.step or 0, str(item.created_at_ms or item.created_at))
        )
