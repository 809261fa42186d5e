"""``sync_to_lane``: sync ORM code on a lane of the active set.

asgiref's ``sync_to_async(f)`` runs ``f`` on the request's one thread, so
gathered sync functions run one after another. ``sync_to_lane(f)`` hands
``f`` to the active connection set as one call: on a free lane, with that
lane's connection, so gathered ``sync_to_lane`` calls run in parallel.
Anything sync ORM code does works inside (several queries, lazy relations,
``transaction.atomic()`` that begins and ends inside); every query it sends,
to any alias, is guarded like an ORM call's, so cancelling the caller
cancels it on the server.

Without an active set, or in a set that runs calls as stock Django does
(parallelism 1), it is ``sync_to_async(f)`` (thread sensitive).

What a lane cannot keep: a transaction ``f`` opens and does not close would
outlive it on a connection the set returns at the end, so ``f`` may not leave
one open - it is rolled back and :class:`TransactionLeftOpenError` raised.
And since ``f`` may touch any database, it leaves the request's thread only
while that thread is outside a transaction of every alias (stock Django runs
it inside that transaction; so does the set).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, overload

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper

from .context import current_set
from .errors import TransactionLeftOpenError
from .targets import Target
from .transactions import EVERY_ALIAS

logger = logging.getLogger("asgi_dbset")

P = ParamSpec("P")
R = TypeVar("R")


@overload
def sync_to_lane(
    func: Callable[P, R], /, *, using: str | None = None
) -> Callable[P, Awaitable[R]]: ...


@overload
def sync_to_lane(
    func: None = None, /, *, using: str | None = None
) -> Callable[[Callable[P, R]], Callable[P, Awaitable[R]]]: ...


def sync_to_lane(
    func: Callable[P, R] | None = None, /, *, using: str | None = None
) -> Any:
    """``await sync_to_lane(f)(*args, **kwargs)`` runs ``f`` on a lane of the
    active set (see the module docstring); also a decorator, with or without
    arguments (``@sync_to_lane``, ``@sync_to_lane(using="replica")``).

    *using*: the alias whose connection the lane holds (default: Django's
    default alias). ``f`` may query other aliases too; the lane's thread then
    opens their connections as stock Django would, and the set returns them.
    """
    if using is not None and not isinstance(using, str):
        raise TypeError(
            f"sync_to_lane(using=...) takes a database alias, not {using!r}: "
            'write sync_to_lane(f, using="default").'
        )
    if using is not None and settings.configured:
        # At decoration time where it can be told (and on each call below):
        # at parallelism 1 the set would run ``f`` as sync_to_async, on any
        # alias; above it, a lane would fail to hold the missing one.
        _check_alias(using)
    if func is None:
        return functools.partial(sync_to_lane, using=using)
    if not callable(func):
        raise TypeError(f"sync_to_lane() takes a sync function, not {func!r}.")
    if inspect.iscoroutinefunction(func):
        raise TypeError(
            f"sync_to_lane() takes a sync function; {func.__qualname__} is async: "
            "await it directly (its ORM calls use the set's lanes already)."
        )
    where = Target(using or DEFAULT_DB_ALIAS, scope=EVERY_ALIAS)
    closing = _closing_transactions(func)
    stock = sync_to_async(func)

    @functools.wraps(func)
    async def on_a_lane(*args: P.args, **kwargs: P.kwargs) -> R:
        if using is not None:
            _check_alias(using)
        dbset = current_set.get()
        if dbset is None or dbset.passes_through:
            return await stock(*args, **kwargs)
        # A set that only records (parallelism 1 with SERVER_TIMING or
        # HISTORY) runs *func* as stock Django on lane 0: a transaction it
        # leaves open stays open there, as under sync_to_async.
        run = closing if dbset.routes_calls else func
        result: R = await dbset.call(run, args, kwargs, where)
        return result

    return on_a_lane


def _check_alias(using: str) -> None:
    if using not in settings.DATABASES:
        raise ValueError(
            f"sync_to_lane(using={using!r}): DATABASES has no alias {using!r}. "
            f"Write one of {', '.join(map(repr, settings.DATABASES))}, or leave "
            "using out for the default database."
        )


def _closing_transactions(func: Callable[P, R]) -> Callable[P, R]:
    """*func*, made to leave no transaction open that it opened: one left open
    is rolled back, and :class:`TransactionLeftOpenError` raised (after the
    function's own exception, if it raised one)."""

    @functools.wraps(func)
    def closing(*args: P.args, **kwargs: P.kwargs) -> R:
        before = _transaction_states()
        try:
            result = func(*args, **kwargs)
        except BaseException:
            _close_left_open(before)
            raise
        left = _close_left_open(before)
        if left:
            raise TransactionLeftOpenError(
                f"{getattr(func, '__qualname__', func)!r} returned inside a "
                f"transaction of {sorted(left)}; it was rolled back. A function "
                "run by sync_to_lane() runs on a connection the set returns when "
                "it ends: close its transactions inside (`with transaction.atomic():`), "
                "or open one across calls with `async with asgi_dbset.atomic():`."
            )
        return result

    return closing


#: Per alias: (atomic blocks open, savepoints of nested ones, in an atomic
#: block, autocommit off), as the thread's connection had them.
_State = tuple[int, int, bool, bool]


def _transaction_states() -> dict[str, _State]:
    return {w.alias: _state(w) for w in connections.all(initialized_only=True)}


def _state(wrapper: BaseDatabaseWrapper) -> _State:
    return (
        len(wrapper.atomic_blocks),
        len(wrapper.savepoint_ids),
        wrapper.in_atomic_block,
        wrapper.connection is not None and not wrapper.autocommit,
    )


_OUTSIDE: _State = (0, 0, False, False)


def _close_left_open(before: dict[str, _State]) -> list[str]:
    """Undo what the call left open on this thread's connections - atomic
    blocks it entered and never exited, autocommit it turned off - back to
    *before*; the aliases it had to undo."""
    left = []
    for wrapper in connections.all(initialized_only=True):
        was = before.get(wrapper.alias, _OUTSIDE)
        now = _state(wrapper)
        if now[0] <= was[0] and (now[3] <= was[3]):
            continue  # (no more blocks than before, autocommit not turned off)
        left.append(wrapper.alias)
        try:
            if was == _OUTSIDE or not (was[2] or was[3]):
                _roll_back_all(wrapper)
            else:
                _roll_back_to(wrapper, was)
        except Exception:
            # The connection cannot say where it is: it must not serve again
            # (Django's Atomic.__exit__ does the same). The lane sees it gone.
            logger.warning(
                "asgi_dbset: could not roll back what a sync_to_lane() function "
                "left open on database %r; closing its connection",
                wrapper.alias,
                exc_info=True,
            )
            _abandon(wrapper)
    return left


def _roll_back_all(wrapper: BaseDatabaseWrapper) -> None:
    """The call opened the connection's transaction: roll all of it back."""
    _abandon_blocks(wrapper, 0, 0, in_atomic_block=False)
    if wrapper.connection is None:
        return  # (closed inside the transaction: nothing to roll back)
    wrapper.rollback()  # (drops its on_commit callbacks too)
    wrapper.set_autocommit(True)


def _roll_back_to(wrapper: BaseDatabaseWrapper, was: _State) -> None:
    """The call entered blocks inside a transaction that was open before it
    (the set's block, a snapshot, the request's own): roll back to the first
    savepoint it made, or, if it made none, doom the enclosing transaction."""
    blocks, savepoints, in_atomic_block, _ = was
    leaked = wrapper.savepoint_ids[savepoints:]
    first = leaked[0] if leaked else None
    if first is not None and wrapper.connection is not None:
        wrapper.savepoint_rollback(first)
    else:
        wrapper.needs_rollback = True
    _abandon_blocks(wrapper, blocks, savepoints, in_atomic_block=in_atomic_block)


def _abandon_blocks(
    wrapper: BaseDatabaseWrapper, blocks: int, savepoints: int, *, in_atomic_block: bool
) -> None:
    # The blocks entered after *blocks* are abandoned: their exits never run.
    wrapper.atomic_blocks = wrapper.atomic_blocks[:blocks]
    wrapper.savepoint_ids = wrapper.savepoint_ids[:savepoints]
    wrapper.in_atomic_block = in_atomic_block
    if not in_atomic_block:
        wrapper.needs_rollback = False


def _abandon(wrapper: BaseDatabaseWrapper) -> None:
    _abandon_blocks(wrapper, 0, 0, in_atomic_block=False)
    try:
        wrapper.close()
    except Exception:
        logger.debug("asgi_dbset: error closing a connection", exc_info=True)
        wrapper.connection = None
