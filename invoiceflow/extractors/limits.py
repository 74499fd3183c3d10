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
    exited by the same task) until ``release`` is set."""

    def __init__(self, factory: SlotFactory) -> None:
        self._factory = factory
        self._entered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._release = asyncio.Event()
        self._linger: asyncio.TimerHandle | None = None
        self.task = asyncio.create_task(self._keep(), name="provider-slot")

    async def _keep(self) -> None:
        try:
            async with self._factory():
                self._entered.set_result(None)
                await self._release.wait()
        except BaseException as exc:
            if not self._entered.done():
                self._entered.set_exception(exc)
                return
            raise

    async def entered(self) -> None:
        await asyncio.shield(self._entered)

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


class ProviderLimiter:
    """In-flight, RPM and TPM limits for one provider, local and optionally shared."""

    def __init__(
        self,
        *,
        max_in_flight: int,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        shared_slot: SlotFactory | None = None,
        shared_rate: RateTaker | None = None,
        linger_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight)
        self._rpm = TokenBucket(requests_per_minute, clock=clock) if requests_per_minute else None
        self._tpm = TokenBucket(tokens_per_minute, clock=clock) if tokens_per_minute else None
        self._tokens_per_minute = tokens_per_minute
        self._shared_slot = shared_slot
        self._shared_rate = shared_rate
        self._linger_s = linger_s
        self._clock = clock
        self._idle: list[_RemoteSlot] = []
        self._held: set[_RemoteSlot] = set()
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
        if self._shared_rate is not None:
            await self._shared_rate("requests", 1)
            if estimate and self._tokens_per_minute:
                await self._shared_rate("tokens", estimate)
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
                    self._idle.append(remote)
                    remote.linger(self._linger_s, self._expire)

    async def _take_remote(self) -> _RemoteSlot | None:
        if self._shared_slot is None:
            return None
        while self._idle:
            slot = self._idle.pop()
            if not slot.task.done():
                slot.cancel_linger()
                return slot
            self._held.discard(slot)
        slot = _RemoteSlot(self._shared_slot)
        self._held.add(slot)
        try:
            await slot.entered()
        except BaseException:
            self._held.discard(slot)
            slot.release()
            raise
        self.stats.remote_acquisitions += 1
        return slot

    def _expire(self, slot: _RemoteSlot) -> None:
        if slot in self._idle:
            self._idle.remove(slot)
            self._held.discard(slot)
            slot.release()

    def _settle_tokens(self, estimate: int, used: int) -> None:
        if self._tpm is not None:
            self._tpm.adjust(used - estimate)

    async def aclose(self) -> None:
        """Give every held provider-wide slot back now."""
        held, self._held, self._idle = list(self._held), set(), []
        for slot in held:
            slot.release()
        results = await asyncio.gather(*(s.task for s in held), return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("releasing a provider slot failed: %s", result)
