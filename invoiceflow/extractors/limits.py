"""Provider limits: calls in flight, requests per minute, tokens per minute.

`ProviderLimiter` enforces them in this process and, when the caller injects them,
also against limits shared by every run (in the flow: Prefect global concurrency
limits). Like `ManifestStore`'s lock factory, the shared parts are plain callables, so
this module knows nothing about Prefect:

* ``shared_slot(wanted)`` returns an async context manager that holds between one and
  ``wanted`` provider-wide in-flight slots (one lease) while entered, and yields how
  many it got;
* ``shared_rate(kind, amount)`` waits until ``amount`` requests (``kind="requests"``)
  or tokens (``kind="tokens"``) may be spent.

Remote slots are expensive to take (a Prefect acquire is a ~0.1 s round trip, and a
refused one polls), so they are taken in leases of as many slots as calls are waiting
(a run at C=256 holds its slots after a handful of round trips, not 128 of them), and a
slot is not given back after every call: it stays with this run while the run has more
calls to make. A lease is returned once all its slots sat unused for ``linger_s``;
another run's waiter then gets them on its next poll. `LimiterStats` measures what
matters for that trade-off: how busy the slots really were.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

log = logging.getLogger(__name__)

RateKind = Literal["requests", "tokens"]
SlotFactory = Callable[[int], contextlib.AbstractAsyncContextManager[int]]
RateTaker = Callable[[RateKind, int], Awaitable[None]]


class Permit:
    """One granted call. ``record`` reports the tokens really used (for TPM)."""

    def __init__(self, limiter: ProviderLimiter | None = None, estimate: int = 0) -> None:
        self._limiter = limiter
        self.estimate = estimate
        self.used: int | None = None

    def record(self, tokens: int) -> None:
        self.used = tokens
        if self._limiter is not None:
            self._limiter._settle_tokens(self.estimate, tokens)


class Limiter(Protocol):
    def call(self, *, tokens: int = 0) -> contextlib.AbstractAsyncContextManager[Permit]: ...


class Unlimited:
    """The `Limiter` that never waits (the default when no limits are configured)."""

    @contextlib.asynccontextmanager
    async def call(self, *, tokens: int = 0) -> AsyncIterator[Permit]:
        yield Permit(None, tokens)


@dataclass
class LimiterStats:
    """How the slots of one limiter were used. Times are `time.monotonic()` seconds."""

    slots: int
    calls: int = 0
    busy_s: float = 0.0
    waited_s: float = 0.0
    max_in_flight: int = 0
    first_start: float | None = None
    last_end: float | None = None
    remote_acquisitions: int = 0

    @property
    def wall_s(self) -> float:
        if self.first_start is None or self.last_end is None:
            return 0.0
        return max(0.0, self.last_end - self.first_start)

    @property
    def utilisation(self) -> float:
        """Busy slot-seconds / (slots x wall seconds), 0..1."""
        return slot_utilisation([self], slots=self.slots)


def slot_utilisation(stats: Iterable[LimiterStats], *, slots: int) -> float:
    """Provider-wide utilisation of ``slots`` shared by several limiters (runs).

    busy slot-seconds of all of them / (slots x the wall time from the first call's
    start to the last call's end). This is the number `make bench` should print: with
    a provider limit of 8 and two runs, 16 busy seconds over 2 s of wall time is 100%.
    """
    items = [s for s in stats if s.first_start is not None and s.last_end is not None]
    if not items or slots < 1:
        return 0.0
    start = min(s.first_start for s in items if s.first_start is not None)
    end = max(s.last_end for s in items if s.last_end is not None)
    wall = end - start
    if wall <= 0:
        return 0.0
    return min(1.0, sum(s.busy_s for s in items) / (slots * wall))


class TokenBucket:
    """Continuous refill at ``per_minute / 60`` a second, holding at most a minute's worth.

    Waiters are served first come, first served (one waits at a time under the lock),
    so a large request is not starved by a stream of small ones.
    """

    def __init__(self, per_minute: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be positive")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._level = self.capacity
        self._stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, amount: float) -> None:
        amount = min(float(amount), self.capacity)  # never wait for the impossible
        async with self._lock:
            while True:
                self._refill()
                if self._level >= amount:
                    self._level -= amount
                    return
                await asyncio.sleep((amount - self._level) / self.rate)

    def adjust(self, delta: float) -> None:
        """Charge (positive) or refund (negative) after the fact; may go below zero."""
        self._refill()
        self._level = min(self.capacity, self._level - delta)


class _RemoteLease:
    """Provider-wide slots taken in one acquisition, held by a keeper task (the context
    must be entered and exited by the same task) until ``release`` is called.

    ``size`` slots once entered; ``idle`` of them are free for this run's next calls.
    """

    def __init__(
        self, factory: SlotFactory, wanted: int, on_entered: Callable[[_RemoteLease], None]
    ) -> None:
        self._factory = factory
        self._on_entered = on_entered
        self._release = asyncio.Event()
        self._linger: asyncio.TimerHandle | None = None
        self.wanted = wanted
        self.size = 0
        self.idle = 0
        self.entered = False
        self.task = asyncio.create_task(self._keep(), name="provider-slots")

    async def _keep(self) -> None:
        async with self._factory(self.wanted) as granted:
            self.size = granted
            self.entered = True
            self._on_entered(self)
            await self._release.wait()

    def release(self) -> None:
        self.cancel_linger()
        self._release.set()

    def linger(self, seconds: float, on_expiry: Callable[[_RemoteLease], None]) -> None:
        self.cancel_linger()
        self._linger = asyncio.get_running_loop().call_later(seconds, on_expiry, self)

    def cancel_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None


class _Reservoir:
    """Permits taken from a shared rate limit in batches and spent locally.

    Each shared take is a round trip (and Prefect's client serializes them per limit),
    so a call taking its own permit would wait in line; a batch of a second's worth
    serves the next calls at once. Permits left at the end decay on the server.
    """

    def __init__(self, kind: RateKind, taker: RateTaker, batch: int) -> None:
        self._kind = kind
        self._taker = taker
        self._batch = max(1, batch)
        self._level = 0
        self._lock = asyncio.Lock()

    async def take(self, amount: int) -> None:
        async with self._lock:
            if self._level < amount:
                wanted = max(amount - self._level, self._batch)
                await self._taker(self._kind, wanted)
                self._level += wanted
            self._level -= amount

    def adjust(self, delta: int) -> None:
        self._level -= delta  # may go negative: the next take pays the debt


@dataclass(frozen=True)
class ProviderLimits:
    """A provider's limits as configured (None: no such limit), shared by every run."""

    max_in_flight: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @property
    def rated(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)


def run_limiter(
    limits: ProviderLimits,
    *,
    run_cap: int | None,
    default_cap: int,
    shared_slot: SlotFactory | None = None,
    shared_rate: RateTaker | None = None,
) -> ProviderLimiter:
    """The one LLM gate of a run: calls in flight, RPM and TPM.

    In flight is the lower of the provider-wide limit and the run's own cap
    (``default_cap`` when neither is set). ``shared_slot`` / ``shared_rate`` make the
    provider-wide limits hold across runs; each is used only when the provider has
    that limit, since otherwise there is nothing to share.
    """
    caps = [cap for cap in (limits.max_in_flight, run_cap) if cap]
    return ProviderLimiter(
        max_in_flight=min(caps) if caps else default_cap,
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        shared_slot=shared_slot if limits.max_in_flight else None,
        shared_rate=shared_rate if limits.rated else None,
    )


class ProviderLimiter:
    """In-flight, RPM and TPM limits for one provider, local and optionally shared.

    With ``shared_slot``, every call also holds one provider-wide slot, taken from a
    lease of this run. A slot freed by a call goes straight to a call of this run that
    is waiting for one, else stays idle for the next call; a lease whose slots all sat
    idle for ``linger_s`` is given back.
    """

    def __init__(
        self,
        *,
        max_in_flight: int,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        shared_slot: SlotFactory | None = None,
        shared_rate: RateTaker | None = None,
        linger_s: float = 0.25,
        max_acquiring: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_in_flight < 1 or max_acquiring < 1:
            raise ValueError("max_in_flight and max_acquiring must be at least 1")
        self._max_acquiring = max_acquiring
        self.max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight)
        self._rpm = TokenBucket(requests_per_minute, clock=clock) if requests_per_minute else None
        self._tpm = TokenBucket(tokens_per_minute, clock=clock) if tokens_per_minute else None
        self._tokens_per_minute = tokens_per_minute
        self._shared_requests = (
            _Reservoir("requests", shared_rate, min(max_in_flight, int(requests_per_minute) // 60))
            if shared_rate is not None and requests_per_minute
            else None
        )
        self._shared_tokens = (
            _Reservoir("tokens", shared_rate, int(tokens_per_minute) // 60)
            if shared_rate is not None and tokens_per_minute
            else None
        )
        self._shared_slot = shared_slot
        self._linger_s = linger_s
        self._clock = clock
        # Leases being acquired or held; released ones leave the set.
        self._leases: set[_RemoteLease] = set()
        self._waiters: deque[asyncio.Future[_RemoteLease]] = deque()
        self._in_flight = 0
        self.stats = LimiterStats(slots=max_in_flight)

    @contextlib.asynccontextmanager
    async def call(self, *, tokens: int = 0) -> AsyncIterator[Permit]:
        """Wait for the rate budgets, then for a slot; hold the slot for the body."""
        asked = self._clock()
        estimate = await self._take_rate_budgets(tokens)
        async with self._slots:
            lease = await self._take_remote()
            started = self._clock()
            self._in_flight += 1
            stats = self.stats
            stats.waited_s += started - asked
            stats.max_in_flight = max(stats.max_in_flight, self._in_flight)
            if stats.first_start is None:
                stats.first_start = started
            try:
                yield Permit(self, estimate)
            finally:
                ended = self._clock()
                self._in_flight -= 1
                stats.calls += 1
                stats.busy_s += ended - started
                stats.last_end = ended
                if lease is not None:
                    self._give(lease)

    async def _take_rate_budgets(self, tokens: int) -> int:
        """Wait for request and token budget (before any slot: waiting for budget must
        not keep a slot idle); the token estimate charged."""
        estimate = max(0, tokens)
        if self._tokens_per_minute:
            estimate = min(estimate, int(self._tokens_per_minute))
        if self._rpm is not None:
            await self._rpm.take(1)
        if self._tpm is not None and estimate:
            await self._tpm.take(estimate)
        if self._shared_requests is not None:
            await self._shared_requests.take(1)
        if self._shared_tokens is not None and estimate:
            await self._shared_tokens.take(estimate)
        return estimate

    async def _take_remote(self) -> _RemoteLease | None:
        if self._shared_slot is None:
            return None
        if (lease := self._idle_lease()) is not None:
            lease.idle -= 1
            lease.cancel_linger()
            return lease
        waiter: asyncio.Future[_RemoteLease] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._acquire_for_waiters()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._give(waiter.result())
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _idle_lease(self) -> _RemoteLease | None:
        """A held lease with an idle slot, the busiest first: calls pack into few leases,
        so the others go idle and are given back."""
        idle = [lease for lease in self._leases if lease.idle and not lease.task.done()]
        return max(idle, key=lambda lease: lease.size - lease.idle, default=None)

    def _acquire_for_waiters(self) -> None:
        """Start a lease for the waiters that no pending acquisition will serve.

        One acquisition asks for as many slots as calls are waiting (the limit may grant
        fewer), so a run ramps up to hundreds of slots in a few round trips. Never
        holding or asking for more than max_in_flight slots keeps a run from snatching
        slots it cannot use, and at most ``max_acquiring`` acquisitions at a time spare
        the limit's server (a burst of them made Prefect on SQLite stall for seconds).
        """
        if self._shared_slot is None:
            return
        pending = [lease for lease in self._leases if not lease.entered]
        asked = sum(lease.wanted for lease in pending)
        held = sum(lease.size for lease in self._leases if lease.entered)
        waiting = sum(not waiter.done() for waiter in self._waiters)
        wanted = min(waiting - asked, self.max_in_flight - held - asked)
        if wanted < 1 or len(pending) >= self._max_acquiring:
            return
        opening = _RemoteLease(self._shared_slot, wanted, self._on_entered)
        self._leases.add(opening)
        opening.task.add_done_callback(lambda task, lease=opening: self._on_closed(lease, task))

    def _on_entered(self, lease: _RemoteLease) -> None:
        self.stats.remote_acquisitions += 1
        for _ in range(lease.size):
            self._give(lease)
        self._acquire_for_waiters()  # it may have granted fewer than were waiting

    def _on_closed(self, lease: _RemoteLease, task: asyncio.Task[None]) -> None:
        self._leases.discard(lease)
        if task.cancelled() or lease.entered:
            if not task.cancelled() and task.exception() is not None:
                log.warning("releasing provider slots failed: %s", task.exception())
            self._acquire_for_waiters()
            return
        # The acquisition itself failed: one waiter learns why.
        error = task.exception()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error or RuntimeError("provider slot not acquired"))
                return
        log.warning("acquiring provider slots failed: %s", error)

    def _give(self, lease: _RemoteLease) -> None:
        """Hand one slot of ``lease`` to a waiting call of this run, or keep it idle; a
        lease with every slot idle lingers, then goes back."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(lease)
                return
        lease.idle += 1
        if lease.idle == lease.size:
            lease.linger(self._linger_s, self._expire)

    def _expire(self, lease: _RemoteLease) -> None:
        if lease in self._leases and lease.idle == lease.size:
            self._leases.discard(lease)  # on its way back; no longer counts for this run
            lease.release()

    def _settle_tokens(self, estimate: int, used: int) -> None:
        if self._tpm is not None:
            self._tpm.adjust(used - estimate)
        if self._shared_tokens is not None:
            self._shared_tokens.adjust(used - estimate)

    async def aclose(self) -> None:
        """Give every held provider-wide slot back now (pending acquisitions too)."""
        leases, self._leases = list(self._leases), set()
        for lease in leases:
            lease.release()
            if not lease.entered:
                lease.task.cancel()
        await asyncio.gather(*(lease.task for lease in leases), return_exceptions=True)
