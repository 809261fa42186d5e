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
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, overload

from asgiref.sync import sync_to_async
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper

from . import snapshots
from .context import current_set
from .errors import TransactionLeftOpenError
from .targets import Target
from .transactions import EVERY_ALIAS

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
        dbset = current_set.get()
        if dbset is None or dbset.passes_through:
            return await stock(*args, **kwargs)
        result: R = await dbset.call(closing, args, kwargs, where)
        return result

    return on_a_lane


def _closing_transactions(func: Callable[P, R]) -> Callable[P, R]:
    """*func*, made to leave no transaction open that it opened: one left open
    is rolled back, and :class:`TransactionLeftOpenError` raised (after the
    function's own exception, if it raised one)."""

    @functools.wraps(func)
    def closing(*args: P.args, **kwargs: P.kwargs) -> R:
        before = _in_transaction()
        try:
            result = func(*args, **kwargs)
        except BaseException:
            _roll_back(_in_transaction() - before)
            raise
        left = _in_transaction() - before
        if left:
            _roll_back(left)
            raise TransactionLeftOpenError(
                f"{getattr(func, '__qualname__', func)!r} returned inside a "
                f"transaction of {sorted(left)}; it was rolled back. A function "
                "run by sync_to_lane() runs on a connection the set returns when "
                "it ends: close its transactions inside (`with transaction.atomic():`), "
                "or open one across calls with `async with asgi_dbset.atomic():`."
            )
        return result

    return closing


def _in_transaction() -> frozenset[str]:
    """The aliases this thread's connections are inside a transaction of (a
    set's snapshot transaction is the set's own, not counted)."""
    return frozenset(
        w.alias
        for w in connections.all(initialized_only=True)
        if w.in_atomic_block
        or (
            w.connection is not None
            and not w.autocommit
            and getattr(w, snapshots.MARK, None) is None
        )
    )


def _roll_back(aliases: frozenset[str]) -> None:
    for alias in aliases:
        wrapper: BaseDatabaseWrapper = connections[alias]
        # The atomic blocks left open are abandoned: their exits never run.
        wrapper.in_atomic_block = False
        wrapper.atomic_blocks = []
        wrapper.savepoint_ids = []
        wrapper.needs_rollback = False
        wrapper.rollback()  # (drops its on_commit callbacks too)
        wrapper.set_autocommit(True)
