"""A lane hands its call to its thread itself (asgi_dbset.hop), not through a
``SyncToAsync`` per call: what code inside an ORM call relies on still holds."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import (
    AsyncToSync,
    SyncToAsync,
    ThreadSensitiveContext,
    async_to_sync,
    sync_to_async,
)
from django.db import connections
from django.db.models.signals import post_save
from django.utils import timezone

from asgi_dbset import connection_set, hop
from asgi_dbset.hop import run_as_stock
from tests.helpers import sleeping
from tests.testapp.models import Tag

pytestmark = pytest.mark.django_db(transaction=True)


class Seen:
    """What the post_save receivers of Tag saw, by tag name."""

    def __init__(self) -> None:
        self.sync: dict[str, tuple[int, str]] = {}
        self.loops: dict[str, asyncio.AbstractEventLoop] = {}

    def on_save(self, instance: Tag, **kwargs: Any) -> None:
        # Runs on the thread of the lane that ran the ORM call.
        self.sync[instance.name] = (
            threading.get_ident(),
            timezone.get_current_timezone_name(),
        )

    async def on_save_async(self, instance: Tag, **kwargs: Any) -> None:
        # Django runs async receivers of a sync send() through async_to_sync.
        self.loops[instance.name] = asyncio.get_running_loop()


@pytest.fixture
def seen() -> Iterator[Seen]:
    seen = Seen()
    post_save.connect(seen.on_save, sender=Tag, weak=False)
    post_save.connect(seen.on_save_async, sender=Tag, weak=False)
    try:
        yield seen
    finally:
        post_save.disconnect(seen.on_save, sender=Tag)
        post_save.disconnect(seen.on_save_async, sender=Tag)


def _close_all() -> None:
    for wrapper in connections.all(initialized_only=True):
        wrapper.close()


async def test_calls_on_every_lane_see_the_callers_context_and_loop(
    seen: Seen,
) -> None:
    loop = asyncio.get_running_loop()
    async with ThreadSensitiveContext():
        request_thread = await sync_to_async(threading.get_ident)()
        with timezone.override("Asia/Tokyo"):
            async with connection_set(parallelism=3) as dbset:
                # Lane 0 is busy sleeping: the writes run on extra lanes.
                await asyncio.gather(
                    sleeping(0.3).acount(),
                    Tag.objects.acreate(name="a"),
                    Tag.objects.acreate(name="b"),
                )
                # Lane 0 is idle now: the next call runs there.
                await Tag.objects.acreate(name="c")
        await sync_to_async(_close_all)()

    writes = [record.lane for record in dbset.records if record.name == "create"]
    # a and b ran on extra lanes, c on lane 0.
    assert writes[2] == 0
    assert 0 not in writes[:2], writes
    assert seen.sync["c"][0] == request_thread
    assert {seen.sync[name][0] for name in "ab"}.isdisjoint({request_thread})
    # asgiref moves the caller's Local storage (its active timezone) onto the
    # thread, and its thread-local makes async_to_sync use this loop.
    assert {tz for _, tz in seen.sync.values()} == {"Asia/Tokyo"}
    assert set(seen.loops) == {"a", "b", "c"}
    assert all(seen_loop is loop for seen_loop in seen.loops.values())


async def test_a_requests_first_call_makes_its_thread_as_stock_and_sees_its_context(
    seen: Seen,
) -> None:
    # No thread-sensitive call has run in this context yet: lane 0 has no
    # thread to hand its call to, so SyncToAsync makes it.
    async with ThreadSensitiveContext():
        with timezone.override("Asia/Tokyo"):
            async with connection_set(parallelism=2) as dbset:
                await Tag.objects.acreate(name="first")
            request_thread = await sync_to_async(threading.get_ident)()
        await sync_to_async(_close_all)()
    assert [record.lane for record in dbset.records] == [0]
    assert seen.sync["first"] == (request_thread, "Asia/Tokyo")


def test_lane_zero_is_the_sync_callers_thread_under_async_to_sync(seen: Seen) -> None:
    async def parallel_part() -> set[int]:
        async with connection_set(parallelism=2) as dbset:
            await asyncio.gather(
                sleeping(0.2).acount(), Tag.objects.acreate(name="beside")
            )
            await Tag.objects.acreate(name="after")
        return {record.lane for record in dbset.records}

    lanes = async_to_sync(parallel_part)()
    assert lanes == {0, 1}
    # Lane 0 is the thread that called async_to_sync, as for stock Django.
    assert seen.sync["after"][0] == threading.get_ident()
    assert seen.sync["beside"][0] != threading.get_ident()
    _close_all()


last_saved: contextvars.ContextVar[str] = contextvars.ContextVar("last_saved")


def _mark(instance: Tag, **kwargs: Any) -> None:
    last_saved.set(instance.name)


async def test_at_parallelism_one_a_call_runs_and_returns_its_context_as_stock(
    seen: Seen,
) -> None:
    # At parallelism 1 the router runs calls through the hop, not SyncToAsync:
    # same thread, and context changes made there come back to the caller.
    post_save.connect(_mark, sender=Tag, weak=False)
    try:
        async with ThreadSensitiveContext():
            request_thread = await sync_to_async(threading.get_ident)()
            await Tag.objects.acreate(name="stock")
            stock_mark = last_saved.get(None)
            async with connection_set(parallelism=1) as dbset:
                assert dbset.passes_through
                await Tag.objects.acreate(name="in a set")
                set_mark = last_saved.get(None)
            await sync_to_async(_close_all)()
    finally:
        post_save.disconnect(_mark, sender=Tag)
    assert (stock_mark, set_mark) == ("stock", "in a set")
    assert seen.sync["stock"][0] == seen.sync["in a set"][0] == request_thread
    assert seen.loops["in a set"] is asyncio.get_running_loop()


@pytest.mark.parametrize("absorbs", [True, False])
async def test_a_cancelled_call_running_async_to_sync_ends_as_under_sync_to_async(
    absorbs: bool,
) -> None:
    # SyncToAsync's rule, kept by the hop: a cancelled caller first cancels the
    # async_to_sync task its call runs; if that task absorbs the cancellation,
    # the call goes on and the caller gets its result.
    async def inner(log: list[str], started: asyncio.Event) -> None:
        log.append("inner started")
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            log.append("inner cancelled")
            if not absorbs:
                raise

    def call(log: list[str], started: asyncio.Event) -> str:
        async_to_sync(inner)(log, started)
        log.append("call went on")
        return "result"

    async def outcome(run: Any) -> list[str]:
        log: list[str] = []
        started = asyncio.Event()
        task = asyncio.ensure_future(run(call, log, started))
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        try:
            log.append(await task)
        except asyncio.CancelledError:
            log.append("caller cancelled")
        await asyncio.sleep(0.05)  # the call's thread, when it goes on
        return log

    async def stock(func: Any, *args: Any) -> Any:
        return await SyncToAsync(func)(*args)

    async with ThreadSensitiveContext():
        await sync_to_async(threading.get_ident)()  # the request's thread exists
        expected = await outcome(stock)
        assert await outcome(run_as_stock) == expected
    if absorbs:
        assert expected == [
            "inner started",
            "inner cancelled",
            "call went on",
            "result",
        ]
    else:
        assert expected[:2] == ["inner started", "inner cancelled"]
        assert "caller cancelled" in expected


async def test_a_call_its_executor_cancels_before_it_runs_ends_as_under_sync_to_async() -> (
    None
):
    # The executor drops a queued call without running it (shut down with
    # cancel_futures): SyncToAsync's caller gets CancelledError, and so must
    # the hop's - never a wait on an outcome nothing will hand back.
    from concurrent.futures import ThreadPoolExecutor

    from asgi_dbset.hop import hop

    async def outcome(run: Any) -> str:
        executor = ThreadPoolExecutor(max_workers=1)
        release = threading.Event()
        executor.submit(release.wait, 10)  # the executor's one thread is busy
        task = asyncio.ensure_future(run(executor, lambda: "ran"))
        await asyncio.sleep(0.05)  # the call is queued behind it
        executor.shutdown(wait=False, cancel_futures=True)
        release.set()
        try:
            return str(await asyncio.wait_for(task, 5))
        except asyncio.CancelledError:
            return "cancelled"
        except TimeoutError:
            return "never ended"

    async def stock(executor: Any, fn: Any) -> Any:
        return await SyncToAsync(fn, thread_sensitive=False, executor=executor)()

    async def lean(executor: Any, fn: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await hop(loop, executor, contextvars.copy_context(), fn)

    expected = await outcome(stock)
    assert expected == "cancelled"
    assert await outcome(lean) == expected


def test_the_sync_thread_above_is_read_as_asgiref_stores_it() -> None:
    # sync_thread_above() answers "nothing stored" from the Local's context
    # variable alone (the Local's own read raises and catches for it); its
    # answer is the Local's own everywhere: in a loop no sync thread awaits,
    # under async_to_sync from a sync thread, and once that has returned.
    assert hop._EXECUTORS_VAR is not None  # the fast path is in use here

    def local() -> object:
        return getattr(AsyncToSync.executors, "current", None)

    seen: dict[str, tuple[object, object]] = {}

    async def in_a_plain_loop() -> None:
        seen["plain"] = (hop.sync_thread_above(), local())

    async def under_async_to_sync() -> None:
        seen["above"] = (hop.sync_thread_above(), local())

    def sync_code() -> None:
        async_to_sync(under_async_to_sync)()

    asyncio.run(in_a_plain_loop())

    async def from_a_thread() -> None:
        await sync_to_async(sync_code, thread_sensitive=False)()
        seen["after"] = (hop.sync_thread_above(), local())

    asyncio.run(from_a_thread())
    assert seen["plain"] == (None, None)
    assert seen["above"][0] is not None
    assert seen["above"][0] is seen["above"][1]
    assert seen["after"] == (None, None)
