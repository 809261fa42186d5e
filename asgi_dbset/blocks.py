"""``asgi_dbset.atomic``: Django's ``transaction.atomic`` for async code.

::

    async with asgi_dbset.atomic():
        order = await Order.objects.acreate(customer=customer)
        await asyncio.gather(
            OrderLine.objects.abulk_create(lines(order)),
            Stock.objects.filter(pk__in=skus).aupdate(reserved=F("reserved") + 1),
        )

A block holds one lane - one connection - from its first statement to its
commit or rollback. Every ORM call of its alias made inside it, by the task
that entered it and by the tasks that task creates inside it (a ``gather``),
runs on that lane, in the order the calls are made, and sees the
transaction's rows. The request's other tasks keep running their calls on its
other lanes, outside the transaction.

Which lane: an extra lane of the block's own when the set may run calls in
parallel and the request's thread (lane 0) is outside every transaction;
otherwise lane 0 - at parallelism 1, when no extra connection can be had, or
when lane 0 is inside a transaction already, of any alias (under
``TestCase``, the block is then a savepoint of the test's transaction, as in
Django). On lane 0, the request's other calls of the alias run inside the
transaction too, as they do on stock Django when the request's thread holds
one.

Django's own ``Atomic`` does the work, on the lane's thread: savepoints when
nested, ``savepoint=False``, ``durable=True``, ``on_commit`` callbacks after
the outermost commit. Leaving the block on an exception - cancellation
included - rolls back, and the rollback reaches the server even when the
caller is cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from asgiref.sync import async_to_sync, iscoroutinefunction
from django.db import DEFAULT_DB_ALIAS, connections, transaction

from . import block_threads
from .aio import finish_shielded, open_or_undo
from .api import active_set, connection_set
from .context import blocks_around, current_block, current_set
from .dbset import ConnectionSet
from .errors import CallNotRunError
from .hop import run_as_stock
from .lanes import Lane
from .snapshots import in_snapshot

# The logger Django's on_commit reports a robust callback's error to.
django_logger = logging.getLogger("django.db.backends.base")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


@dataclass(slots=True, frozen=True)
class Entered:
    """Django's Atomic, entered on a lane's thread."""

    atomic: Any
    #: Left on an exception, it rolls back at once: the transaction it began,
    #: or its savepoint (a nested block without one only marks the enclosing
    #: block for rollback).
    rolls_back: bool
    #: The lane's thread's Django connection of the block's alias, inside the
    #: transaction: what the routers see of it (:func:`.targets.seen_from_blocks`).
    connection: Any


@dataclass(slots=True, eq=False)
class Block:
    """One entered ``asgi_dbset.atomic()``: where its calls run."""

    dbset: ConnectionSet
    alias: str
    lane: Lane
    #: Django's Atomic, as entered on the lane's thread.
    entered: Entered
    #: The task that entered it: only that task may leave it.
    owner: asyncio.Task[Any] | None
    #: The block around this one, if any (of any alias).
    outer: Block | None
    #: The outermost block of its alias on its lane: leaving it frees the lane.
    holds_lane: bool
    #: Left (committed or rolled back): a task created inside it that goes on
    #: afterwards still has it in its context, but is no longer in it.
    ended: bool = False

    def lane_for(self, dbset: ConnectionSet, alias: str) -> Lane | None:
        """The lane a call of *alias* in this set runs on here, if a block of
        this one's chain holds one for that alias."""
        for block in blocks_around(self):
            if block.dbset is dbset and block.alias == alias:
                return block.lane
        return None

    def lane_for_any_alias(
        self, dbset: ConnectionSet, *, orm_call: bool = False
    ) -> Lane | None:
        """The lane a call that may touch any database (``sync_to_lane``, or
        an ORM call whose databases are known only as it runs: *orm_call*)
        runs on here: the one lane the blocks of this set in this chain hold.
        Blocks of several databases on different lanes cannot share one call."""
        lanes: list[Lane] = []
        for block in blocks_around(self):
            if block.dbset is dbset and block.lane not in lanes:
                lanes.append(block.lane)
        if len(lanes) > 1 and orm_call:
            raise transaction.TransactionManagementError(
                "asgi_dbset: this ORM call (a prefetch_related() whose querysets "
                "the routers may send to several databases, or objects saved to "
                "several databases) is made inside asgi_dbset.atomic() blocks of "
                "several databases, which run on different connections: one call "
                "cannot run inside all of them. Make the call outside the inner "
                "block, or make one call per database (Prefetch(queryset=qs.using("
                "...)), one aadd() per database)."
            )
        if len(lanes) > 1:
            raise transaction.TransactionManagementError(
                "asgi_dbset: sync_to_lane() inside asgi_dbset.atomic() blocks of "
                "several databases, which run on different connections: one "
                "function cannot run inside all of them. Call it outside the inner "
                "block, or split it into one function per database."
            )
        return lanes[0] if lanes else None

    def of(self, dbset: ConnectionSet, alias: str) -> Block | None:
        """The block of *alias* in *dbset* around the caller, if any."""
        for block in blocks_around(self):
            if block.dbset is dbset and block.alias == alias:
                return block
        return None


def atomic(
    using: str | F | None = None, savepoint: bool = True, durable: bool = False
) -> Any:
    """Django's ``transaction.atomic(using, savepoint, durable)`` for async
    code: ``async with atomic():``, ``@atomic`` or ``@atomic(using="other")``
    on an async function. See the module docstring.

    Outside a request it opens a connection set of its own for the block.
    """
    if callable(using):  # bare @atomic
        return AsyncAtomic(None, savepoint, durable)(using)
    return AsyncAtomic(using, savepoint, durable)


class AsyncAtomic:
    """What :func:`atomic` returns: an async context manager, and a decorator
    of async functions (a fresh block per call)."""

    def __init__(
        self,
        using: str | None = None,
        savepoint: bool = True,
        durable: bool = False,
    ) -> None:
        if using is not None and not isinstance(using, str):
            raise TypeError(
                f"asgi_dbset.atomic(using=...) takes a database alias such as "
                f'"default", not {type(using).__name__} {using!r}.'
            )
        if not isinstance(savepoint, bool) or not isinstance(durable, bool):
            raise TypeError(
                "asgi_dbset.atomic(savepoint=..., durable=...) take True or False."
            )
        self.using = using
        self.savepoint = savepoint
        self.durable = durable
        # What each entry made (per task: one instance may be entered by
        # several tasks at once, as a decorator is).
        self._entered: dict[
            asyncio.Task[Any] | None,
            list[tuple[Block, Any, Any, ConnectionSet | None]],
        ] = {}

    def __repr__(self) -> str:
        return (
            f"asgi_dbset.atomic(using={self.using!r}, savepoint={self.savepoint}, "
            f"durable={self.durable})"
        )

    # -- decorator -----------------------------------------------------------

    def __call__(self, func: F) -> F:
        if not iscoroutinefunction(func):
            name = getattr(func, "__qualname__", repr(func))
            raise TypeError(
                f"asgi_dbset.atomic decorates async functions; {name} is "
                "synchronous. Use django.db.transaction.atomic on sync code, or "
                "write it as `async def`."
            )
        using, savepoint, durable = self.using, self.savepoint, self.durable

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            async with AsyncAtomic(using, savepoint, durable):
                return await func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    # -- sync use is a mistake -----------------------------------------------

    def __enter__(self) -> None:
        raise TypeError(
            "asgi_dbset.atomic() is an async context manager: write "
            "`async with asgi_dbset.atomic():`. In sync code use "
            "django.db.transaction.atomic()."
        )

    def __exit__(self, *exc_info: object) -> None:  # pragma: no cover - never entered
        return None

    # -- async context manager -----------------------------------------------

    async def __aenter__(self) -> None:
        alias = self.using or DEFAULT_DB_ALIAS
        if alias not in connections.settings:
            raise ValueError(
                f"asgi_dbset.atomic(using={alias!r}): no such database in "
                f"DATABASES (known: {', '.join(connections.settings)})."
            )
        own = None
        dbset = active_set()
        if dbset is None:
            own = connection_set()
            dbset = await own.__aenter__()
        outer = current_block.get()
        enclosing = None if outer is None else outer.of(dbset, alias)
        enter = functools.partial(_enter, alias, self.savepoint, self.durable)

        async def open_() -> tuple[Lane, Any]:
            if enclosing is not None:
                lane = enclosing.lane
                return lane, await dbset.run_on_lane(lane, alias, enter, ())
            return await dbset.open_block(alias, enter, ())

        async def undo(opened: tuple[Lane, Any]) -> None:
            # Cancelled while Django's atomic was entered on the lane's thread:
            # leave it as a block the exception left (a rollback, to the
            # savepoint if nested), or the lane stays inside it and the
            # enclosing block's exit would pop this one's savepoint instead of
            # committing.
            lane, entered = opened
            cancelled = asyncio.CancelledError()
            leave = functools.partial(_leave, entered, type(cancelled), cancelled, None)
            try:
                await dbset.run_on_lane(lane, alias, leave, ())
            finally:
                if enclosing is None:
                    dbset.close_block(lane)

        try:
            lane, entered = await open_or_undo(open_(), undo)
        except BaseException as exc:
            if own is not None:
                await own.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        task = asyncio.current_task()
        block = Block(
            dbset, alias, lane, entered, task, outer, holds_lane=enclosing is None
        )
        token = current_block.set(block)
        # Sync code in the block (sync_to_async) runs on the block's lane.
        threads = block_threads.enter(block)
        self._entered.setdefault(task, []).append((block, token, threads, own))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task = asyncio.current_task()
        stack = self._entered.get(task)
        if not stack:
            raise RuntimeError(
                "asgi_dbset.atomic() was left in another task than the one that "
                "entered it. Enter and leave it in one coroutine (`async with`), "
                "and await the tasks it starts inside it."
            )
        block, token, threads, own = stack.pop()
        if not stack:
            del self._entered[task]
        dbset = block.dbset
        leave = functools.partial(_leave, block.entered, exc_type, exc, tb)
        if exc_type is not None and block.entered.rolls_back:
            # Left on an exception, the block rolls back its transaction or its
            # savepoint, and everything run in it since: a call still running
            # there for a caller that gave up (its query not cancelled then:
            # that would have aborted the transaction) is stopped now, its
            # query cancelled, and the rollback does not wait for it.
            dbset.cancel_abandoned(block.lane, block.alias)
        try:
            # The commit or rollback runs to its end on the server, and the
            # lane is free only afterwards, even if this task is cancelled.
            await finish_shielded(dbset.run_on_lane(block.lane, block.alias, leave, ()))
        except CallNotRunError:
            # The block's transaction is gone already: the set closed first
            # (a task that outlived its request) and rolled it back, or the
            # block's connection died (the server ended the transaction with
            # it; its lane is broken). Leaving on an exception goes on with
            # that exception, as Django's atomic() does when its rollback
            # fails on a dead connection; leaving normally raises, as the
            # block could not commit.
            if exc is None or not (dbset.closed or block.lane.broken):
                raise
        finally:
            block.ended = True
            current_block.reset(token)
            block_threads.leave(threads)
            if block.holds_lane:
                dbset.close_block(block.lane)
            if own is not None:
                await own.__aexit__(exc_type, exc, tb)


def _enter(alias: str, savepoint: bool, durable: bool) -> Entered:
    """On the block's lane: Django's atomic, entered on this thread."""
    connection = transaction.get_connection(alias)
    outermost = not connection.in_atomic_block
    atomic = transaction.atomic(using=alias, savepoint=savepoint, durable=durable)
    atomic.__enter__()
    # (A nested block pushes its savepoint's id, or None without one.)
    return Entered(
        atomic, outermost or connection.savepoint_ids[-1] is not None, connection
    )


def _leave(
    entered: Entered,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> None:
    """On the block's lane: commit (and run the on_commit callbacks) or roll back."""
    entered.atomic.__exit__(exc_type, exc, tb)


async def on_commit(
    func: Callable[[], Any], using: str | None = None, robust: bool = False
) -> None:
    """Django's ``transaction.on_commit`` for async code: inside
    ``asgi_dbset.atomic()`` of that alias, *func* runs after the outermost
    commit, in order with the callbacks registered on the block's lane (by
    signal receivers, say), and never if it rolls back. Outside one, Django's
    ``on_commit`` takes it on the request's own connection, exactly as
    ``sync_to_async(transaction.on_commit)`` would: now in autocommit (a
    *robust* callback's error logged, not raised), or at the commit of a
    transaction that connection is in. *func* may be a coroutine function.
    """
    alias = using or DEFAULT_DB_ALIAS
    block = current_block.get()
    dbset = active_set()
    if dbset is None and block is not None:
        ended = current_set.get()
        if ended is not None and ended.closed:
            # A block of a set that has closed (its task outlived the
            # request) was rolled back: its callback must never run, as it
            # would at once outside the block (run_on_lane refuses).
            dbset = ended
    inside = None if block is None or dbset is None else block.of(dbset, alias)
    callback = async_to_sync(func) if iscoroutinefunction(func) else func
    if inside is None:
        await run_as_stock(_on_commit_outside_blocks, callback, alias, robust)
        return
    register = functools.partial(
        transaction.on_commit, callback, using=alias, robust=robust
    )
    await inside.dbset.run_on_lane(inside.lane, alias, register, ())


def _on_commit_outside_blocks(
    callback: Callable[[], Any], alias: str, robust: bool
) -> None:
    """On the request's thread: Django's ``on_commit`` on its connection."""
    wrapper = connections[alias]
    if not in_snapshot(wrapper) or wrapper.in_atomic_block:
        transaction.on_commit(callback, using=alias, robust=robust)
        return
    # The connection is in the set's snapshot, a transaction of the set's
    # own (Django would refuse: "manual transaction management"). For the
    # request it is in autocommit, where Django runs the callback now - so
    # does this, logging a robust callback's error as Django does.
    if not robust:
        callback()
        return
    try:
        callback()
    except Exception as exc:
        django_logger.error(
            f"Error calling {callback.__qualname__} in on_commit() (%s).",
            exc,
            exc_info=True,
        )
