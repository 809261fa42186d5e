"""Database routers on lanes.

Stock Django asks ``DATABASE_ROUTERS`` on the request's thread, the one that
runs every query. A lane's call runs on another thread, so a router that keeps
per-request state in ``threading.local`` (django-multidb-router's pinning
router: after a write, reads go to the primary) cannot see it there. The
library cannot keep such a router's semantics, and says so at startup
(``asgi_dbset.W003``). A router whose per-request state lives in a context
variable (the recipe in docs/deployment.md) works on lanes exactly as on
stock Django. Whatever alias Django picks on a lane, the call's queries there
can be cancelled.
"""

from __future__ import annotations

import asyncio
import threading
from contextvars import ContextVar
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connections
from django.db.models.signals import post_save
from django.test import override_settings

from asgi_dbset import connection_set
from asgi_dbset.budget import budget
from asgi_dbset.checks import check_routers
from tests.helpers import active_sleeps, sleeping
from tests.testapp.models import Author, Book

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

# -- a pinning router as django-multidb-router writes it: state per thread ----------

_thread_pins = threading.local()


def this_thread_is_pinned() -> bool:
    return bool(getattr(_thread_pins, "pinned", False))


def pin_this_thread() -> None:
    _thread_pins.pinned = True


def unpin_this_thread() -> None:
    _thread_pins.pinned = False


class ThreadPinningRouter:
    """Reads go to the replica ("other") unless this thread wrote before."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "default" if this_thread_is_pinned() else "other"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        pin_this_thread()
        return "default"

    def allow_relation(self, *args: Any, **kwargs: Any) -> bool:
        return True


# -- the same router with its state in a context variable (the documented recipe) ---

# One mutable dict per request, set where the request starts: every task and
# every lane of the request sees (and updates) that same dict.
request_pins: ContextVar[dict[str, bool] | None] = ContextVar(
    "tests.request_pins", default=None
)


class ContextPinningRouter:
    def db_for_read(self, model: Any, **hints: Any) -> str:
        pins = request_pins.get()
        return "default" if pins and pins.get("pinned") else "other"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        pins = request_pins.get()
        if pins is not None:
            pins["pinned"] = True
        return "default"

    def allow_relation(self, *args: Any, **kwargs: Any) -> bool:
        return True


class StatelessRouter:
    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "other" if model is Book else "default"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "default"


def check_ids(routers: list[Any]) -> list[str]:
    with override_settings(DATABASE_ROUTERS=routers):
        return [str(message.id) for message in check_routers()]


def test_a_router_with_thread_local_state_is_named_at_startup() -> None:
    with override_settings(DATABASE_ROUTERS=[ThreadPinningRouter()]):
        (message,) = check_routers()
    assert message.id == "asgi_dbset.W003"
    assert "ThreadPinningRouter" in message.msg
    assert "threading.local" in message.msg
    assert "ContextVar" in str(message.hint)
    # By dotted path too, as settings usually name them.
    assert check_ids([f"{__name__}.ThreadPinningRouter"]) == ["asgi_dbset.W003"]


def test_routers_without_thread_state_pass() -> None:
    assert check_ids([ContextPinningRouter(), StatelessRouter()]) == []
    assert check_ids([]) == []


def test_no_router_warning_when_queries_never_leave_the_request_thread() -> None:
    with override_settings(
        DATABASE_ROUTERS=[ThreadPinningRouter()],
        ASGI_DBSET={"MAX_PARALLELISM": 1},
    ):
        assert check_routers() == []


async def reads_after_a_write(parallel: bool) -> list[bool]:
    """A request: one write, then ten gathered reads of the row it wrote."""
    token = request_pins.set({})
    try:
        async with ThreadSensitiveContext():
            if parallel:
                async with connection_set(parallelism=4, lease_timeout=5.0):
                    seen = await _write_then_read()
            else:
                seen = await _write_then_read()
            await sync_to_async(connections.close_all)()
    finally:
        request_pins.reset(token)
    return seen


async def _write_then_read() -> list[bool]:
    author = await Author.objects.acreate(name="just written")
    return list(
        await asyncio.gather(
            *(Author.objects.filter(pk=author.pk).aexists() for _ in range(10))
        )
    )


@override_settings(DATABASE_ROUTERS=[ContextPinningRouter()])
async def test_a_context_variable_router_reads_its_writes_on_lanes_as_on_stock() -> (
    None
):
    stock = await reads_after_a_write(parallel=False)
    with_lanes = await reads_after_a_write(parallel=True)
    assert stock == [True] * 10
    assert with_lanes == stock
    assert budget.total == 0


def other_sleeps() -> int:
    from django.conf import settings

    return active_sleeps(settings.DATABASES["other"]["NAME"])


async def test_a_query_a_lane_runs_on_another_alias_is_cancelled_too() -> None:
    """The call is for 'default'; a receiver of its save queries 'other' on the
    same lane's thread. Cancelling the caller cancels that query as well."""

    def slow_audit(sender: Any, instance: Author, **kwargs: Any) -> None:
        sleeping(30, Book).using("other").count()

    post_save.connect(slow_audit, sender=Author)
    try:
        async with ThreadSensitiveContext():
            async with connection_set(parallelism=2, lease_timeout=5.0) as dbset:
                # (Books: the save commits its author while this may still wait
                # to start, since the two run in parallel.)
                busy = asyncio.ensure_future(sleeping(0.5, Book).acount())  # lane 0
                save = asyncio.ensure_future(Author.objects.acreate(name="audited"))
                for _ in range(200):
                    if await asyncio.to_thread(other_sleeps) == 1:
                        break
                    await asyncio.sleep(0.02)
                assert {r.lane for r in dbset.records if r.name == "create"} == {1}
                save.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await save
                assert await busy == 0
                for _ in range(50):
                    if await asyncio.to_thread(other_sleeps) == 0:
                        break
                    await asyncio.sleep(0.02)
                assert await asyncio.to_thread(other_sleeps) == 0
            await sync_to_async(connections.close_all)()
    finally:
        post_save.disconnect(slow_audit, sender=Author)
    assert budget.total == 0
