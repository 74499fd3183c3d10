"""Provider limits: in-flight slots, RPM/TPM budgets, slot reuse, utilisation, and the
Prefect-backed limits shared by concurrent runs (real Prefect server, loopback LLM)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from devtools.llm_server import LLMServerHandle, running_llm_server
from invoiceflow.extractors.limits import (
    LimiterStats,
    ProviderLimiter,
    ProviderLimits,
    TokenBucket,
    run_limiter,
    slot_utilisation,
)

pytestmark = pytest.mark.llm

API_KEY = "sk-limits"
TEXT = "ACME GmbH\nInvoice ACME-42\nTotal EUR 1.190,00"


class FakeSharedSlots:
    """An in-memory stand-in for the provider-wide limit: grants up to the slots asked
    for (at least one, waiting for it), and counts holds and acquisitions."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.changed = asyncio.Condition()
        self.held = 0
        self.max_held = 0
        self.acquisitions = 0
        self.fail_next = False

    @contextlib.asynccontextmanager
    async def slot(self, wanted: int) -> AsyncIterator[int]:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("limit server unreachable")
        async with self.changed:
            await self.changed.wait_for(lambda: self.held < self.limit)
            granted = min(wanted, self.limit - self.held)
            self.acquisitions += 1
            self.held += granted
            self.max_held = max(self.max_held, self.held)
        try:
            yield granted
        finally:
            async with self.changed:
                self.held -= granted
                self.changed.notify_all()


def test_the_run_gate_takes_the_lower_cap_and_exists_without_provider_limits() -> None:
    unlimited = ProviderLimits()
    assert run_limiter(unlimited, run_cap=8, default_cap=64).max_in_flight == 8
    assert run_limiter(unlimited, run_cap=None, default_cap=64).max_in_flight == 64
    provider = ProviderLimits(max_in_flight=4, requests_per_minute=600)
    assert run_limiter(provider, run_cap=8, default_cap=64).max_in_flight == 4
    assert run_limiter(provider, run_cap=2, default_cap=64).max_in_flight == 2


async def test_a_call_waiting_for_token_budget_holds_no_slot() -> None:
    """Issue 12: one gate, and its slot is never held while waiting for TPM/RPM budget."""
    limiter = run_limiter(ProviderLimits(tokens_per_minute=600), run_cap=1, default_cap=64)
    order: list[str] = []

    async def call(name: str, tokens: int) -> None:
        async with limiter.call(tokens=tokens):
            order.append(name)
            await asyncio.sleep(0.05)

    await call("drains the budget", 600)
    budget_bound = asyncio.create_task(call("waits 0.5 s for budget", 5))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(call("needs no budget", 0), 0.3)  # the one slot was free
    await budget_bound
    assert order == ["drains the budget", "needs no budget", "waits 0.5 s for budget"]


async def test_in_flight_is_bounded() -> None:
    limiter = ProviderLimiter(max_in_flight=3)
    running = peak = 0

    async def call() -> None:
        nonlocal running, peak
        async with limiter.call():
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.02)
            running -= 1

    await asyncio.gather(*(call() for _ in range(20)))
    assert peak == 3
    assert limiter.stats.calls == 20
    assert limiter.stats.max_in_flight == 3
    assert 0 < limiter.stats.utilisation <= 1


async def test_shared_slots_are_kept_between_calls_then_given_back() -> None:
    shared = FakeSharedSlots(limit=2)
    limiter = ProviderLimiter(max_in_flight=2, shared_slot=shared.slot, linger_s=0.2)
    for _ in range(10):
        async with limiter.call():
            await asyncio.sleep(0)

    # Ten sequential calls, one remote acquisition: the slot stayed with the run.
    assert shared.acquisitions == 1
    assert limiter.stats.remote_acquisitions == 1
    assert shared.held == 1
    await asyncio.sleep(0.5)  # linger expires
    assert shared.held == 0


async def test_shared_slots_bound_two_runs_together() -> None:
    shared = FakeSharedSlots(limit=3)
    runs = [ProviderLimiter(max_in_flight=3, shared_slot=shared.slot, linger_s=0.05) for _ in "ab"]

    async def call(limiter: ProviderLimiter) -> None:
        async with limiter.call():
            await asyncio.sleep(0.01)

    await asyncio.gather(*(call(limiter) for limiter in runs for _ in range(15)))
    assert shared.max_held == 3
    for limiter in runs:
        await limiter.aclose()
    assert shared.held == 0


class SlowSharedSlots(FakeSharedSlots):
    """Acquiring takes a while, like a round trip to a busy limit server."""

    def __init__(self, limit: int, delay_s: float) -> None:
        super().__init__(limit)
        self.delay_s = delay_s
        self.acquiring = 0
        self.max_acquiring = 0

    @contextlib.asynccontextmanager
    async def slot(self, wanted: int) -> AsyncIterator[int]:
        self.acquiring += 1
        self.max_acquiring = max(self.max_acquiring, self.acquiring)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.acquiring -= 1
        async with super().slot(wanted) as granted:
            yield granted


async def test_a_run_never_asks_for_more_slots_than_it_can_use() -> None:
    shared = SlowSharedSlots(limit=10, delay_s=0.02)
    limiter = ProviderLimiter(max_in_flight=4, shared_slot=shared.slot, max_acquiring=2)

    async def call() -> None:
        async with limiter.call():
            await asyncio.sleep(0.01)

    await asyncio.gather(*(call() for _ in range(60)))
    # Freed slots went to this run's next calls: three leases (1, 1, then the 2 still
    # missing) served sixty calls, never more than two acquisitions at a time, never
    # more than four slots held.
    assert shared.acquisitions == 3
    assert shared.max_acquiring <= 2
    assert shared.max_held == 4
    await limiter.aclose()
    assert shared.held == 0


class AnsweredSharedSlots(FakeSharedSlots):
    """Every acquisition waits until the test answers it: one round trip to the limit
    server is the test answering every acquisition pending at that moment."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.pending: list[asyncio.Future[None]] = []

    @contextlib.asynccontextmanager
    async def slot(self, wanted: int) -> AsyncIterator[int]:
        answer = asyncio.get_running_loop().create_future()
        self.pending.append(answer)
        await answer
        async with super().slot(wanted) as granted:
            yield granted

    async def answer_pending(self, *, unless: Callable[[], bool]) -> bool:
        """Wait (up to 5 s) for an acquisition to be asked for, then answer all of them;
        False, answering none, once ``unless()`` holds first."""
        async with asyncio.timeout(5):
            while not self.pending:
                if unless():
                    return False
                await asyncio.sleep(0.005)
        for answer in self.pending:
            answer.set_result(None)
        self.pending.clear()
        return True


async def test_a_run_takes_hundreds_of_slots_in_a_few_round_trips() -> None:
    """Issue 13: at C=256 a run must not ramp up one slot per round trip (0.1 s each on
    Prefect: 13 s to fill 256 slots two acquisitions at a time). Counted in round trips,
    not seconds, so a loaded machine cannot fail it."""
    shared = AnsweredSharedSlots(limit=256)
    limiter = ProviderLimiter(max_in_flight=256, shared_slot=shared.slot)
    release = asyncio.Event()
    started = 0

    async def call() -> None:
        nonlocal started
        async with limiter.call():
            started += 1
            await release.wait()

    calls = [asyncio.create_task(call()) for _ in range(512)]
    round_trips = 0
    while round_trips < 10 and await shared.answer_pending(unless=lambda: started == 256):
        round_trips += 1
    assert started == 256
    assert round_trips <= 2
    assert shared.max_held == 256
    # The second 256 calls run on the slots the first ones free: no new round trip.
    release.set()
    async with asyncio.timeout(5):
        await asyncio.gather(*calls)
    assert started == 512
    assert not shared.pending
    assert shared.acquisitions <= 3  # two at once, then one for the rest
    assert limiter.stats.max_in_flight == 256
    await limiter.aclose()
    assert shared.held == 0


async def test_a_lease_goes_back_once_all_its_slots_are_idle() -> None:
    shared = FakeSharedSlots(limit=8)
    limiter = ProviderLimiter(max_in_flight=8, shared_slot=shared.slot, linger_s=0.05)
    await asyncio.gather(*(_hold(limiter, 0.01) for _ in range(8)))
    long_call = asyncio.create_task(_hold(limiter, 0.4))
    await asyncio.sleep(0.2)
    assert shared.held >= 1  # the long call's lease stays
    await long_call
    await asyncio.sleep(0.2)
    assert shared.held == 0


async def test_calls_after_every_slot_lingered_out_still_get_slots() -> None:
    shared = FakeSharedSlots(limit=2)
    limiter = ProviderLimiter(max_in_flight=2, shared_slot=shared.slot, linger_s=0.01)
    for _ in range(3):
        await asyncio.gather(*(_hold(limiter, 0.01) for _ in range(4)))
        await asyncio.sleep(0.05)  # every slot expires and is given back
        assert shared.held == 0
    assert shared.acquisitions == 6
    await limiter.aclose()


async def _hold(limiter: ProviderLimiter, seconds: float) -> None:
    async with limiter.call():
        await asyncio.sleep(seconds)


async def test_failed_shared_acquisition_propagates_without_leaking() -> None:
    shared = FakeSharedSlots(limit=1)
    limiter = ProviderLimiter(max_in_flight=1, shared_slot=shared.slot)
    shared.fail_next = True
    with pytest.raises(RuntimeError, match="unreachable"):
        async with limiter.call():
            pass
    async with limiter.call():  # the local slot was released, the next call works
        assert shared.held == 1
    await limiter.aclose()
    assert shared.held == 0


async def test_requests_per_minute_paces_calls() -> None:
    limiter = ProviderLimiter(max_in_flight=50, requests_per_minute=120)  # 2 per second
    started = time.monotonic()
    for _ in range(121):  # a minute's burst, then one more
        async with limiter.call():
            pass
    # The 121st request waits for half a second of refill.
    assert time.monotonic() - started >= 0.45


async def test_tokens_per_minute_charges_the_real_usage() -> None:
    bucket = TokenBucket(6000)  # 100 tokens a second
    await bucket.take(6000)
    bucket.adjust(-100)  # a call used 100 tokens less than estimated: refunded
    refunded = asyncio.ensure_future(bucket.take(100))
    await asyncio.sleep(0)
    assert refunded.done()  # taken at once, without sleeping for refill
    bucket.adjust(200)  # a call used 200 more than estimated: owed
    started = time.monotonic()
    await bucket.take(1)
    assert time.monotonic() - started >= 1.5


def test_slot_utilisation_merges_runs() -> None:
    a = LimiterStats(slots=4, busy_s=8.0, first_start=0.0, last_end=2.0)
    b = LimiterStats(slots=4, busy_s=4.0, first_start=1.0, last_end=3.0)
    # 12 busy slot-seconds over 3 s of 4 slots.
    assert slot_utilisation([a, b], slots=4) == pytest.approx(1.0)
    assert a.utilisation == pytest.approx(1.0)
    assert b.utilisation == pytest.approx(0.5)
    assert slot_utilisation([LimiterStats(slots=4)], slots=4) == 0.0


async def test_server_side_utilisation_agrees_with_the_limiter(llm: LLMServerHandle) -> None:
    from devtools.llm_server import utilisation
    from invoiceflow.extractors.openai import OpenAIExtractor

    llm.reset()
    llm.configure(latency_s=0.2)
    limiter = ProviderLimiter(max_in_flight=4)
    async with OpenAIExtractor(base_url=llm.base_url, api_key=API_KEY, limiter=limiter) as ex:
        await asyncio.gather(*(ex.extract_document(TEXT) for _ in range(16)))
    at_server = utilisation(llm.stats(), slots=4)
    # Four busy slots the whole time, apart from the ramp and HTTP overhead.
    assert 0.5 < at_server <= 1.0
    assert 0.5 < limiter.stats.utilisation <= 1.0
    assert utilisation({"busy_s": 0, "first_start": None, "last_end": None}, slots=4) == 0.0


# --- shared across runs, on the real Prefect server --------------------------------------


@pytest.fixture(scope="module")
def llm() -> Iterator[LLMServerHandle]:
    with running_llm_server(api_key=API_KEY) as handle:
        yield handle


async def test_provider_limit_holds_across_concurrent_runs(
    local_stack: Any, llm: LLMServerHandle
) -> None:
    from prefect.client.orchestration import get_client

    from blocks.extractor import ExtractorBlock
    from flows.llm_limits import ProviderLimitNames, provider_limiter

    block_name = f"limits-{uuid.uuid4().hex[:8]}"
    block = ExtractorBlock(
        kind="openai",
        base_url=llm.base_url,
        api_key=SecretStr(API_KEY),
        model="test-model",
        max_in_flight=4,
        requests_per_minute=6000,
    )
    llm.reset()
    llm.configure(latency_s=0.3)
    # Two runs, each allowed 8 calls in flight by its own parameters.
    limiters = [await provider_limiter(block, block_name, max_in_flight=8) for _ in range(2)]
    assert all(limiter is not None for limiter in limiters)
    extractors = [block.build(limiter=limiter) for limiter in limiters]
    try:
        started = time.monotonic()
        await asyncio.gather(
            *(
                ex.extract_document(TEXT, invoice_key=f"run{i}-{j}")
                for i, ex in enumerate(extractors)
                for j in range(12)
            )
        )
        elapsed = time.monotonic() - started
    finally:
        for ex, limiter in zip(extractors, limiters, strict=True):
            await ex.aclose()  # type: ignore[attr-defined]
            assert limiter is not None
            await limiter.aclose()

    stats = llm.stats()
    assert stats["total"] == 24
    # Provider-wide: never more than 4 calls at the server, though the runs allow 16.
    assert 2 <= stats["max_in_flight"] <= 4
    assert elapsed >= 24 * 0.3 / 4 * 0.9
    runs = [lim.stats for lim in limiters if lim]
    utilisation = slot_utilisation(runs, slots=4)
    print(f"provider slot utilisation across two runs: {utilisation:.0%} in {elapsed:.2f} s")
    # Accounting, not speed (how busy the slots stay is the benchmark's figure): every
    # call held a slot for at least the server's latency, and no more than 4 slot-seconds
    # per second of the runs' span were counted.
    assert sum(run.busy_s for run in runs) >= 24 * 0.3 * 0.9
    assert 0.0 < utilisation <= 1.0

    names = ProviderLimitNames.for_block(block_name)
    async with get_client() as client:
        in_flight = await client.read_global_concurrency_limit_by_name(names.in_flight)
        requests = await client.read_global_concurrency_limit_by_name(names.requests)
    assert (in_flight.limit, in_flight.active_slots) == (4, 0)  # every slot given back
    assert (requests.limit, requests.slot_decay_per_second) == (6000, 100.0)


async def test_prefect_rate_limit_paces_requests(local_stack: Any) -> None:
    from prefect.client.orchestration import get_client

    from flows.llm_limits import ProviderLimitNames, prefect_rate

    names = ProviderLimitNames.for_block(f"rate-{uuid.uuid4().hex[:8]}")
    async with get_client() as client:
        # A tiny budget that refills fast: 2 requests, 5 more per second.
        await client.upsert_global_concurrency_limit_by_name(
            names.requests, 2, slot_decay_per_second=5.0
        )
    take = prefect_rate(names)
    started = time.monotonic()
    for _ in range(5):
        await take("requests", 1)
    # Two at once, then three more at no more than 5 per second.
    assert time.monotonic() - started >= 0.5


async def test_a_lease_gets_the_free_slots_then_waits_for_one(local_stack: Any) -> None:
    """Prefect grants all or nothing: a lease asked for more slots than are free gets
    the free ones, and with none free polls for one (the limiter leases the rest once it
    has it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse

    from flows.leases import prefect_slots

    name = f"invoiceflow-llm:lease-{uuid.uuid4().hex[:8]}"
    async with get_client() as client:
        await client.upsert_global_concurrency_limit_by_name(name, 4)
        response = await client.increment_concurrency_slots_with_lease(
            names=[name], slots=3, mode="concurrency", lease_duration=60
        )
        other_run = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
        slots = prefect_slots(name)
        async with slots(4) as granted:
            assert granted == 1
            assert (await client.read_global_concurrency_limit_by_name(name)).active_slots == 4
            second = slots(2)  # kept: a dropped context manager is finalized (released)
            waiting = asyncio.create_task(second.__aenter__())
            await asyncio.sleep(0.5)
            assert not waiting.done()  # none free: it polls
            await client.release_concurrency_slots_with_lease(lease_id=other_run.lease_id)
            assert await asyncio.wait_for(waiting, 10) == 1
        limit = await client.read_global_concurrency_limit_by_name(name)
        assert limit.active_slots == 1  # the first lease went back; the second is held
        await second.__aexit__(None, None, None)
        assert (await client.read_global_concurrency_limit_by_name(name)).active_slots == 0


async def test_provider_limits_follow_the_block_and_are_written_only_when_they_differ(
    local_stack: Any,
) -> None:
    from prefect.client.orchestration import get_client

    from blocks.extractor import ExtractorBlock
    from flows.llm_limits import ProviderLimitNames, ensure_provider_limits

    names = ProviderLimitNames.for_block(f"ensure-{uuid.uuid4().hex[:8]}")
    block = ExtractorBlock(
        kind="openai", api_key=SecretStr(API_KEY), model="m", max_in_flight=4,
        requests_per_minute=600, tokens_per_minute=None,
    )  # fmt: skip

    async def limits() -> dict[str, tuple[int, float | None, Any]]:
        async with get_client() as client:
            found = {}
            for name in (names.in_flight, names.requests, names.tokens):
                with contextlib.suppress(Exception):
                    limit = await client.read_global_concurrency_limit_by_name(name)
                    found[name] = (limit.limit, limit.slot_decay_per_second, limit.updated)
            return found

    await ensure_provider_limits(block, names)
    created = await limits()
    assert {name: found[:2] for name, found in created.items()} == {
        names.in_flight: (4, 0.0),
        names.requests: (600, 10.0),
    }

    await ensure_provider_limits(block, names)  # as the block says: nothing written
    assert await limits() == created

    changed = block.model_copy(update={"max_in_flight": 9, "requests_per_minute": 120})
    await ensure_provider_limits(changed, names)
    updated = await limits()
    assert {name: found[:2] for name, found in updated.items()} == {
        names.in_flight: (9, 0.0),
        names.requests: (120, 2.0),
    }
    assert all(updated[name][2] > created[name][2] for name in updated)
