"""Provider limits: calls in flight, requests per minute, tokens per minute.

`ProviderLimiter` enforces them in this process and, when the caller injects them,
also against limits shared by every run (in the flow: Prefect global concurrency
limits). Like `ManifestStore`'s lock factory, the shared parts are plain callables, so
this module knows nothing about Prefect:

* ``shared_slot()`` returns an async context manager that holds one provider-wide
  in-flight slot while entered;
* ``shared_rate(kind, amount)`` waits until ``amount`` requests (``kind="requests"``)
  or tokens (``kind="tokens"``) may be spent.

Remote slots are expensive to take (a Prefect acquire is a ~0.1 s round trip, and a
refused one polls), so a slot is not given back after every call: it stays with this
run while the run has more calls to make, and is returned after ``linger_s`` without
use. Another run's waiter then gets it on its next poll. `LimiterStats` measures what
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
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)

RateKind = Literal["requests", "tokens"]
SlotFactory = Callable[[], contextlib.AbstractAsyncContextManager[Any]]
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


class _RemoteSlot:
    """One provider-wide slot, held by a keeper task (the context must be entered and
    exited by the same task) until ``release`` is called."""

    def __init__(self, factory: SlotFactory, on_entered: Callable[[_RemoteSlot], None]) -> None:
        self._factory = factory
        self._on_entered = on_entered
        self._release = asyncio.Event()
        self._linger: asyncio.TimerHandle | None = None
        self.entered = False
        self.task = asyncio.create_task(self._keep(), name="provider-slot")

    async def _keep(self) -> None:
        async with self._factory():
            self.entered = True
            self._on_entered(self)
            await self._release.wait()

    def release(self) -> None:
        self.cancel_linger()
        self._release.set()

    def linger(self, seconds: float, on_expiry: Callable[[_RemoteSlot], None]) -> None:
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

    With ``shared_slot``, every call also holds one provider-wide slot. A slot freed by
    a call goes straight to a call of this run that is waiting for one, else stays idle
    for ``linger_s`` for the next call, else is given back.
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
        self._idle: list[_RemoteSlot] = []
        self._held: set[_RemoteSlot] = set()
        self._waiters: deque[asyncio.Future[_RemoteSlot]] = deque()
        self._in_flight = 0
        self.stats = LimiterStats(slots=max_in_flight)

    @contextlib.asynccontextmanager
    async def call(self, *, tokens: int = 0) -> AsyncIterator[Permit]:
        """Wait for the rate budgets, then for a slot; hold the slot for the body."""
        asked = self._clock()
        estimate = max(0, tokens)
        if self._tokens_per_minute:
            estimate = min(estimate, int(self._tokens_per_minute))
        # Rate budgets first: waiting for them must not keep a slot idle.
        if self._rpm is not None:
            await self._rpm.take(1)
        if self._tpm is not None and estimate:
            await self._tpm.take(estimate)
        if self._shared_requests is not None:
            await self._shared_requests.take(1)
        if self._shared_tokens is not None and estimate:
            await self._shared_tokens.take(estimate)
        async with self._slots:
            remote = await self._take_remote()
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
                if remote is not None:
                    self._give(remote)

    async def _take_remote(self) -> _RemoteSlot | None:
        if self._shared_slot is None:
            return None
        while self._idle:
            slot = self._idle.pop()
            slot.cancel_linger()
            if not slot.task.done():
                return slot
            self._held.discard(slot)
        waiter: asyncio.Future[_RemoteSlot] = asyncio.get_running_loop().create_future()
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

    def _acquire_for_waiters(self) -> None:
        """Start acquisitions for waiters that no pending acquisition will serve.

        Whichever slot comes first (a new one, or one another call of this run frees)
        serves a waiter; a later one goes idle. Never holding or awaiting more than
        max_in_flight slots keeps a run from snatching slots it cannot use, and at most
        ``max_acquiring`` acquisitions at a time spare the limit's server: a burst of
        them made Prefect on SQLite stall for seconds (16 at once took 7 s to grant,
        2 at a time ramp 16 slots up in about a second).
        """
        if self._shared_slot is None:
            return
        pending = sum(not slot.entered for slot in self._held)
        waiting = sum(not waiter.done() for waiter in self._waiters)
        wanted = min(
            waiting - pending,
            self.max_in_flight - len(self._held),
            self._max_acquiring - pending,
        )
        for _ in range(wanted):
            opening = _RemoteSlot(self._shared_slot, self._on_entered)
            self._held.add(opening)
            opening.task.add_done_callback(lambda task, slot=opening: self._on_closed(slot, task))

    def _on_entered(self, slot: _RemoteSlot) -> None:
        self.stats.remote_acquisitions += 1
        self._give(slot)
        self._acquire_for_waiters()

    def _on_closed(self, slot: _RemoteSlot, task: asyncio.Task[None]) -> None:
        self._held.discard(slot)
        if task.cancelled() or slot.entered:
            if not task.cancelled() and task.exception() is not None:
                log.warning("releasing a provider slot failed: %s", task.exception())
            self._acquire_for_waiters()
            return
        # The acquisition itself failed: one waiter learns why.
        error = task.exception()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error or RuntimeError("provider slot not acquired"))
                return
        log.warning("acquiring a provider slot failed: %s", error)

    def _give(self, slot: _RemoteSlot) -> None:
        """Hand a slot to a waiting call of this run, or keep it idle for a while."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._idle.append(slot)
        slot.linger(self._linger_s, self._expire)

    def _expire(self, slot: _RemoteSlot) -> None:
        if slot in self._idle:
            self._idle.remove(slot)
            self._held.discard(slot)  # on its way back; no longer counts for this run
            slot.release()

    def _settle_tokens(self, estimate: int, used: int) -> None:
        if self._tpm is not None:
            self._tpm.adjust(used - estimate)
        if self._shared_tokens is not None:
            self._shared_tokens.adjust(used - estimate)

    async def aclose(self) -> None:
        """Give every held provider-wide slot back now (pending acquisitions too)."""
        held, self._held, self._idle = list(self._held), set(), []
        for slot in held:
            slot.release()
            if not slot.entered:
                slot.task.cancel()
        await asyncio.gather(*(s.task for s in held), return_exceptions=True)
