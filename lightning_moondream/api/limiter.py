"""Pacing requests to the rate a service admits for one API key.

Moondream Cloud admits 2 requests per second per key (10 once funded) and answers 429
above it. What limits a run there is that rate, not latency, and the rate belongs to
the key, not to a client: every client of one key in a process shares one
``RateLimiter`` (``limiter_for``), and a multi-process run can grant each process a
share of it (``set_rate``, or ``share`` of a tier).

Turns. A request takes a turn (``reserve``), waits for it, and confirms it just before
it is sent (``confirm``). Requests start at most ``rate x headroom`` per second, so how
many are in flight follows from Little's law (in flight = admitted rate x latency) and
concurrency needs no limit of its own beyond the caller's ``max_concurrency``. The
headroom (``HEADROOM`` for the key's shared limiters) is the margin that keeps requests
arriving a little off their turn still ``1 / rate`` apart, as a service admitting
bursts of one requires. Confirming only ever moves a turn later, by what was learnt
while it waited:

- a ``Retry-After`` pause ordered meanwhile is waited out, by every request of the key;
- starts keep their spacing from the previous request's actual start, so a late
  wake-up pushes the requests behind it instead of bunching them; a retry keeps it
  too, as the service counts it like any request;
- the key's second request waits for the first one's answer (at most
  ``FIRST_ANSWER_WAIT``) and keeps its spacing from that answer: a process's first
  request warms up its HTTP stack and connection and arrives tens of milliseconds late,
  which would leave the second too close behind it;
- on a tier not yet tried (below), a request waits for the answers of those before it.

Rates. Configured (``requests_per_second``, or granted by ``set_rate``), or found.

A found rate first climbs down a ladder of tiers: the rates the key may be admitted at,
Moondream Cloud's documented 2 and 10 requests per second (``TIERS``) for the key's
shared limiters. It starts at the highest, so a funded key sends at its limit from its
first request and a default key meets one 429 before it settles at 2. A 429 (not one of
a busy key, below) takes it a tier down at once, and a tier is tried again only after
``REMEMBER`` seconds without a 429: one 429 so finds the limit, where probing between
tiers would cost a 429 and its pause each time. The processes of a run each take an
equal share of the tier, on staggered turns (``share``). Below the lowest tier it slows
down as a configured rate does. A service that says it sets no limit (the local one,
by ``RATE_LIMIT_HEADER``) leaves the ladder: its requests go unpaced, as a limiter's
without tiers do, until a 429. What answers do to a rate:

- without one (no tiers, or the ladder left), no limit until the first 429; then half
  the rate the client was sending at, but no
  more than twice what the service admitted meanwhile, nor than one request per
  ``Retry-After`` (the send rate of a burst says nothing of the limit);
- a ``Retry-After`` pauses every request of the key that long; ``Retry-After: 0``
  (retry at once) asks for no slowing down, so it changes no rate;
- on a 429, multiplicative decrease (x ``DECREASE``), once per congestion event (a 429
  of a request sent before the last decrease is the same event), never below the rate
  the service admitted over the last seconds, nor below one request per
  ``Retry-After`` (the service's word that a request will then be admitted), nor below
  ``MIN_RATE``;
- a 429 of a request that waited out the last pause, with none admitted since, says
  the key is busy with other clients' requests rather than that this client's rate is
  too high: the Retry-After then sets no floor, the decrease is gentler
  (x ``BUSY_DECREASE``, so as not to starve against them) and teaches no limit;
- after a run of successes (about one second's worth), an increase: up to a configured
  or granted rate, by ``INCREASE`` requests per second. A found rate doubles after every
  ``DOUBLING_RUN`` successes until a paced request is refused; then it rises by
  ``INCREASE``, never past halfway to the lowest rate refused in the last ``REMEMBER``
  seconds, and not at all once within ``CLOSE`` of it. It so settles just under the
  limit instead of probing over it again and again, each time at the cost of a 429
  and its pause.

The limiter only computes waits on its clock; the client sleeps them, so both clock and
sleep are injectable and tests run on a fake clock with no real waiting.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from pydantic import SecretStr

TIERS = (2.0, 10.0)
"""Requests per second Moondream Cloud admits per key: by default, and once funded."""
HEADROOM = 0.97
"""Share of the rate that the key's shared limiters send at (see the module docstring)."""
DECREASE = 0.5
"""Factor applied to the rate on a 429."""
BUSY_DECREASE = 0.8
"""Factor applied on a 429 that says the key is busy with others (see the module docstring)."""
INCREASE = 0.5
"""Requests per second added after a run of successes, once a found rate was refused."""
MIN_RATE = 0.1
"""Requests per second the rate never goes below."""
MIN_SUCCESS_RUN = 4
"""Fewest successes in a row before an increase (at least one second's worth)."""
DOUBLING_RUN = 2
"""Successes in a row before a found rate doubles, while no paced request was refused."""
WINDOW = 2.0
"""Seconds over which the send rate and the admitted rate are measured."""
FIRST_ANSWER_WAIT = 1.0
"""Most seconds the key's second request waits for the first one's answer."""
POLL = 0.02
"""Seconds between looks at whether the first answer came."""
REMEMBER = 600.0
"""Seconds a refused rate bounds the increases of a found rate."""
TRY_RUN = 2
"""Requests admitted at a tier before it counts as tried (see ``_awaits_answer``)."""
CLOSE = 0.1
"""Gap, as a share of the rate, to the lowest refused rate under which a found rate stays."""


@dataclass(frozen=True)
class Reservation:
    """A request's turn: how long to wait first, and when (on the limiter's clock).

    Attributes:
        wait: Seconds to wait from when the turn was given.
        at: When the turn comes.
        confirmed: Whether ``confirm`` has settled it.
    """

    wait: float
    at: float
    confirmed: bool = False


@dataclass(frozen=True)
class Turns:
    """A process's share of a key's rate: when it may send.

    Attributes:
        rate: Requests per second of this process.
        phase: Its first turn on the limiter's clock; the others follow every
            ``1 / (rate x HEADROOM)`` seconds. ``None`` for a process alone: no other
            process's turns to keep clear of.
    """

    rate: float
    phase: float | None

    @classmethod
    def of(cls, key_rate: float, rank: int, processes: int) -> Turns:
        """Rank ``rank``'s turns of ``processes`` sharing ``key_rate``.

        The phase is set on the wall clock, which every process (on every host kept in
        time) agrees on, and given on the monotonic clock the limiter paces by.
        """
        if processes == 1:
            return cls(key_rate, None)
        pace = key_rate * HEADROOM
        wall_to_monotonic = time.monotonic() - time.time()
        phase = (rank / pace + wall_to_monotonic) % (processes / pace)
        return cls(key_rate / processes, phase)


def _check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise ValueError(f"requests_per_second must be a number > 0, got {rate!r}")
    if not math.isfinite(rate):
        raise ValueError(f"requests_per_second must be finite, got {rate!r}")
    return float(rate)


class RateLimiter:
    """The pace of one API key at one service, shared by its clients in a process.

    Thread-safe; waits are computed, never slept here.

    Args:
        requests_per_second: The rate to start at and never exceed; ``None`` to find it.
        clock: Seconds on a monotonic clock.
        headroom: Share of the rate sent at, in (0, 1]; 1 sends exactly at the rate.
        tiers: The rates the key may be admitted at (``TIERS`` for the key's shared
            limiters), a found rate's first guesses: it starts at the highest. Without
            tiers, a found rate is no limit until the first 429.

    Raises:
        ValueError: For a rate or tier that is not a finite number > 0, or a headroom
            outside (0, 1].
    """

    def __init__(
        self,
        requests_per_second: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        headroom: float = 1.0,
        tiers: Sequence[float] = (),
    ) -> None:
        if not 0 < headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {headroom!r}")
        self.headroom = headroom
        self._lock = threading.Lock()
        self._clock = clock
        self._rate = None if requests_per_second is None else _check_rate(requests_per_second)
        self._ceiling = self._rate
        # The tier ladder: the key's rate, as a tier, while nothing else sets it.
        self._tiers = tuple(sorted(_check_rate(tier) for tier in tiers))
        self._tier: float | None = None
        self._tier_since = -math.inf
        self._tier_admitted = 0
        self._share = (0, 1)
        # Turns: planned (reserve), then settled (confirm).
        self._phase: float | None = None
        self._next_slot = -math.inf
        self._next_start = -math.inf
        self._paused_until = -math.inf
        self._admitted_since_pause = True
        self._last_start: float | None = None
        self._starts = self._answers = 0
        self._answered = False
        # What the answers taught.
        self._last_decrease = -math.inf
        self._run = 0
        self._refused = math.inf
        self._refused_until = -math.inf
        self._sent: deque[float] = deque()
        self._admitted: deque[float] = deque()
        if self._rate is None and self._tiers:
            self._take_tier(self._tiers[-1], since=-math.inf, tried=False)

    @property
    def rate(self) -> float | None:
        """Requests per second in force (sent at ``rate x headroom``); ``None``: no limit."""
        with self._lock:
            return self._rate

    def set_rate(self, requests_per_second: float, *, phase: float | None = None) -> None:
        """Set the rate and its ceiling from outside, e.g. this process's share of a key.

        Args:
            requests_per_second: The rate, and the most it may rise to.
            phase: Requests then start only at ``phase + k / (requests_per_second x
                headroom)`` on the limiter's clock (``k`` whole): processes sharing a
                key with staggered phases take turns, and never send in the same
                instant, which a service admitting a burst of one would refuse.

        Raises:
            ValueError: If the rate is not a finite number > 0.
        """
        rate = _check_rate(requests_per_second)
        with self._lock:
            self._tier = None
            self._rate = self._ceiling = rate
            self._phase = phase

    def share(self, rank: int, processes: int) -> None:
        """Take process ``rank``'s share of the key's tier, ``processes`` sending with the key.

        Each process sends at ``tier / processes`` on the staggered turns of
        :class:`Turns`, as a configured rate's shares do; a tier found by one process is
        found alike by the others, which meet the same limit. A rate set from outside
        (configured or granted) is left as it is.
        """
        with self._lock:
            self._share = (rank, processes)
            if self._tier is not None:
                self._take_tier(self._tier, since=self._tier_since, tried=self._tier_tried)

    def record_unlimited(self) -> None:
        """Take the service's word that it sets no rate limit: no tier paces requests then.

        A 429 it sends anyway (a fault) is met as by a limiter without tiers.
        """
        with self._lock:
            if self._tier is not None:
                self._tier = None
                self._rate = self._ceiling = self._phase = None

    def reserve(self, delay: float = 0.0) -> Reservation:
        """Take the next turn to send, no sooner than ``delay`` seconds from now.

        A request that must wait anyway (a retry's backoff) is charged the earliest free
        turn, so its own wait never holds back the requests behind it; when its wait is
        over, ``confirm`` keeps it a turn's spacing from the request before.
        """
        with self._lock:
            now = self._clock()
            earliest = self._on_turn(max(now, self._paused_until, self._next_slot))
            if self._rate is not None:
                self._next_slot = earliest + self._spacing()
            wait = max(delay, earliest - now)
            self._sent.append(now + wait)
            self._trim(self._sent, now)
            return Reservation(wait, now + wait)

    def confirm(self, turn: Reservation) -> Reservation:
        """Settle a turn when it comes: send if the answer's ``wait`` is 0, else wait again.

        The turn moves only later (see the module docstring): past a pause ordered while
        it waited, to keep its spacing from the previous request's start (a retry's
        too: the service counts it alike), or until an answer it waits for comes. The
        answer's ``wait`` is what comes on top of the turn's own, already waited.
        """
        with self._lock:
            due = max(turn.at, self._clock())
            if turn.confirmed and due >= self._paused_until:
                return replace(turn, wait=0.0)
            if not turn.confirmed and self._awaits_answer(due):
                assert self._last_start is not None
                wait = min(POLL, self._last_start + FIRST_ANSWER_WAIT - due)
                return replace(turn, wait=wait, at=due + wait)
            if self._phase is None:
                start = max(due, self._paused_until, self._next_start)
            else:
                # A phase keeps its grid: a late wake-up sends at once, not a turn later.
                start = self._on_turn(max(turn.at, self._paused_until, self._next_start))
            if not turn.confirmed:
                self._starts += 1
                self._last_start = start
            if self._rate is not None:
                self._next_start = max(self._next_start, start + self._spacing())
            return replace(turn, wait=max(0.0, start - due), at=start, confirmed=True)

    def record_success(self) -> None:
        """Count an admitted request; a run of them raises the rate."""
        with self._lock:
            now = self._clock()
            self._note_answer(now)
            self._admitted_since_pause = True
            self._admitted.append(now)
            self._trim(self._admitted, now)
            if self._rate is None:
                return
            self._run += 1
            if self._run >= self._run_needed(now):
                self._run = 0
                self._rate = self._raised(self._rate, now)
            if self._tier is None:
                return
            self._tier_admitted += 1
            higher = [tier for tier in self._tiers if tier > self._tier]
            if higher and self._rate == self._ceiling and now - self._tier_since >= REMEMBER:
                self._take_tier(higher[0], since=now, tried=False)

    def record_error(self) -> None:
        """Count an answer that says nothing of the pace (a server error)."""
        with self._lock:
            self._note_answer(self._clock())

    def record_rate_limited(self, sent_at: float, retry_after: float | None) -> None:
        """React to a 429 of a request sent at ``sent_at`` (on this clock)."""
        with self._lock:
            now = self._clock()
            self._note_answer(now)
            self._run = 0
            # Refused after waiting a pause out, with nothing admitted since it began:
            # the key is busy with others' requests, whatever this client's rate.
            busy = sent_at >= self._paused_until and not self._admitted_since_pause
            if retry_after:
                self._paused_until = max(self._paused_until, now + retry_after)
                self._admitted_since_pause = False
            if retry_after == 0 or sent_at < self._last_decrease:
                # Retry-After 0 asks for no slowing down; a request sent before the last
                # decrease was sent at the old rate, which that decrease answered.
                return
            self._trim(self._admitted, now)
            admitted = len(self._admitted) / WINDOW
            floor = max(MIN_RATE, admitted)
            if retry_after and not busy:
                floor = max(floor, 1.0 / retry_after)
            if self._tier is not None and not busy and self._tier > self._tiers[0]:
                # A tier below one refused is tried: falling costs no more 429s.
                lower = max(tier for tier in self._tiers if tier < self._tier)
                self._take_tier(lower, since=now, tried=True)
                self._last_decrease = now
                return
            if self._rate is None:
                sending = self._send_rate(now)
                if sending is None:
                    return  # too little seen to know a rate; the pause and backoff pace it
                # A burst's send rate says nothing of the limit: what the service
                # admitted, and the pace its Retry-After asks for, say more.
                decreased = sending * DECREASE
                if admitted:
                    decreased = min(decreased, 2 * admitted)
                if retry_after:
                    decreased = min(decreased, 1.0 / retry_after)
            elif busy:
                decreased = self._rate * BUSY_DECREASE
            else:
                decreased = self._rate * DECREASE
                if self._ceiling is None:
                    self._refused = min(self._refused_rate(now), self._rate)
                    self._refused_until = now + REMEMBER
            self._rate = max(decreased, floor)
            if self._ceiling is not None:
                self._rate = min(self._rate, self._ceiling)
            self._last_decrease = now

    @property
    def _tier_tried(self) -> bool:
        """Whether the tier is tried, or was fallen to below a tier refused.

        The first answer met a full bucket; the next one, paced, tells the tier.
        """
        return self._tier_admitted >= TRY_RUN

    def _take_tier(self, tier: float, *, since: float, tried: bool) -> None:
        """Send at this process's share of ``tier``, found at ``since``."""
        self._tier, self._tier_since = tier, since
        if not tried:
            self._tier_admitted = 0
        elif not self._tier_tried:
            self._tier_admitted = TRY_RUN
        turns = Turns.of(tier, *self._share)
        self._rate = self._ceiling = turns.rate
        self._phase = turns.phase

    def _run_needed(self, now: float) -> int:
        """Successes in a row that raise the rate in force."""
        assert self._rate is not None
        if self._ceiling is None and math.isinf(self._refused_rate(now)):
            return DOUBLING_RUN
        return max(MIN_SUCCESS_RUN, math.ceil(self._rate))

    def _raised(self, rate: float, now: float) -> float:
        """The rate after a run of successes at ``rate``."""
        if self._ceiling is not None:
            return min(rate + INCREASE, self._ceiling)
        refused = self._refused_rate(now)
        if math.isinf(refused):
            return 2 * rate
        if refused <= rate * (1 + CLOSE):
            return rate
        return min(rate + INCREASE, (rate + refused) / 2)

    def _refused_rate(self, now: float) -> float:
        """The lowest paced rate refused in the last ``REMEMBER`` seconds; inf if none."""
        return self._refused if now < self._refused_until else math.inf

    def _note_answer(self, now: float) -> None:
        """Count an answer; the key's first says its request had arrived by then."""
        if not self._answered and self._awaits_answer(now):
            self._next_start = max(self._next_start, now + self._spacing())
        self._answered = True
        self._answers += 1

    def _awaits_answer(self, now: float) -> bool:
        """Whether turns wait for an answer, and not yet ``FIRST_ANSWER_WAIT`` for it.

        Paced turns wait for the key's first answer (without a phase: a grid keeps
        clear of others' turns already), and, on a tier not yet tried, for the answer
        of every request before them: a tier that is too high then costs one 429.
        """
        if self._rate is None or self._last_start is None:
            return False
        if now >= self._last_start + FIRST_ANSWER_WAIT:
            return False
        untried = self._tier is not None and not self._tier_tried
        if untried and self._answers < self._starts:
            return True
        return not self._answered and self._phase is None

    def _spacing(self) -> float:
        """Seconds between starts at the rate in force."""
        assert self._rate is not None
        return 1.0 / (self._rate * self.headroom)

    def _on_turn(self, moment: float) -> float:
        """The first of this limiter's turns at or after ``moment`` (any, without a phase)."""
        if self._phase is None or self._ceiling is None:
            return moment
        spacing = 1.0 / (self._ceiling * self.headroom)
        turns = math.ceil((moment - self._phase) / spacing - 1e-9)
        return self._phase + turns * spacing

    def _send_rate(self, now: float) -> float | None:
        self._trim(self._sent, now)
        span = max(self._sent, default=now) - min(self._sent, default=now)
        return (len(self._sent) - 1) / span if span > 0 else None

    @staticmethod
    def _trim(times: deque[float], now: float) -> None:
        while times and times[0] < now - WINDOW:
            times.popleft()


_shared: dict[tuple[str, str], RateLimiter] = {}
_shared_lock = threading.Lock()


def limiter_for(
    base_url: str, api_key: SecretStr, requests_per_second: float | None = None
) -> RateLimiter:
    """The process's one limiter of an API key at a service, sending at ``HEADROOM``.

    The key is kept only as a digest. A rate given here sets the shared limiter's rate,
    for every client of the key.
    """
    digest = hashlib.sha256(api_key.get_secret_value().encode()).hexdigest()
    with _shared_lock:
        limiter = _shared.setdefault(
            (base_url, digest), RateLimiter(headroom=HEADROOM, tiers=TIERS)
        )
    if requests_per_second is not None:
        limiter.set_rate(requests_per_second)
    return limiter
