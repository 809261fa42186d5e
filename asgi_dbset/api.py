"""What user code writes: ``connection_set()``, ``db_parallelism``, ``active_set()``.

The settings layer: these read ``ASGI_DBSET`` and map it onto the explicit
keyword arguments of :class:`~.dbset.ConnectionSet`.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any, NoReturn, TypeVar

from asgiref.sync import iscoroutinefunction
from django.core.exceptions import ImproperlyConfigured

from .conf import conf
from .context import current_set
from .dbset import BlockSettings, ConnectionSet
from .validation import validate_parallelism, validate_statement_timeout

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


# What a block form changed in the set it entered: the settings to restore
# (its entry in the set's open blocks), and whether it holds the snapshot.
_Previous = tuple[BlockSettings, bool]


class Unset:
    """Marks an argument left out, where None is a meaningful value."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET = Unset()


def active_set() -> ConnectionSet | None:
    """The connection set that ORM calls made here would use, or None."""
    dbset = current_set.get()
    if dbset is None or not dbset.serves_here():
        return None
    return dbset


def connection_set(
    *,
    parallelism: int | None = None,
    lease_timeout: float | None = None,
    statement_timeout: float | Unset | None = UNSET,
    snapshot: bool = False,
) -> ConnectionSet:
    """A new connection set for ``async with``, outside or inside requests.

    ``parallelism`` defaults to ``ASGI_DBSET["DEFAULT_PARALLELISM"]`` and is
    capped by ``MAX_PARALLELISM``; ``lease_timeout`` defaults to
    ``LEASE_TIMEOUT``; ``statement_timeout`` (seconds of server time per query,
    None for no limit) to ``STATEMENT_TIMEOUT``. With ``snapshot=True``
    every call reads one consistent snapshot of its database::

        async with connection_set(parallelism=4):
            a, b = await asyncio.gather(A.objects.acount(), B.objects.acount())
    """
    _validate_snapshot(snapshot, "connection_set(snapshot=...)")
    return set_from_settings(
        conf.snapshot(),
        parallelism=parallelism,
        lease_timeout=lease_timeout,
        statement_timeout=statement_timeout,
        snapshot=snapshot,
    )


def _pooled(values: Mapping[str, Any]) -> frozenset[str]:
    pooled = values["TRANSACTION_POOLED"]  # (checked at startup)
    return pooled if isinstance(pooled, frozenset) else frozenset(pooled)


def _validate_snapshot(value: object, what: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{what} takes True or False, not {value!r}.")


def set_from_settings(
    values: Mapping[str, Any],
    *,
    parallelism: int | None = None,
    lease_timeout: float | None = None,
    statement_timeout: float | Unset | None = UNSET,
    snapshot: bool = False,
) -> ConnectionSet:
    """:func:`connection_set` from settings already read (``conf.snapshot()``):
    the middleware reads them once per request."""
    if parallelism is None:
        parallelism = int(values["DEFAULT_PARALLELISM"])  # (checked at startup)
    else:
        validate_parallelism(parallelism, what="connection_set(parallelism=...)")
    return ConnectionSet(
        parallelism=min(parallelism, int(values["MAX_PARALLELISM"])),
        lease_timeout=values["LEASE_TIMEOUT"]
        if lease_timeout is None
        else lease_timeout,
        statement_timeout=(
            values["STATEMENT_TIMEOUT"]
            if isinstance(statement_timeout, Unset)
            else statement_timeout
        ),
        snapshot=snapshot,
        transaction_pooled=_pooled(values),
    )


def _is_method_decorator_dummy(func: Callable[..., Any]) -> bool:
    # method_decorator() applies the decorator once to a synchronous dummy when
    # the class is defined, only to copy its attributes (Django 5.2, 6.1).
    return getattr(func, "__module__", None) == "django.utils.decorators"


def _decorated_by_method_decorator() -> tuple[Callable[..., Any], object] | None:
    """When method_decorator() applies the decorator to its dummy: the method it
    decorates, and what it was given - the class when it decorates a method by
    name, else the method itself. None if Django's frames are not those of
    Django 5.2 and 6.1 (the call's own check then refuses a sync view)."""
    # The nearest _multi_decorate: past db_parallelism's own frames and
    # _update_method_wrapper's, which applies the decorator to the dummy.
    frame = sys._getframe(1)
    for _ in range(8):
        if (
            frame.f_code.co_name == "_multi_decorate"
            and frame.f_globals.get("__name__") == "django.utils.decorators"
        ):
            break
        if frame.f_back is None:
            return None
        frame = frame.f_back
    else:
        return None
    method = frame.f_locals.get("method")
    caller = frame.f_back
    if not callable(method) or caller is None or caller.f_code.co_name != "_dec":
        return None
    return method, caller.f_locals.get("obj")


def _bound_view(func: Callable[..., Any]) -> object | None:
    """The instance whose method method_decorator() hands the decorator on each
    call (a partial of the bound method, maybe under the decorators applied
    before this one), or None."""
    wrapped: object = func
    for _ in range(16):
        if isinstance(wrapped, functools.partial):
            return getattr(wrapped.func, "__self__", None)
        wrapped = getattr(wrapped, "__wrapped__", None)  # (from functools.wraps)
    return None


def _is_async_view(cls: object) -> bool | None:
    """Whether ``cls`` is an async class-based view (False if it is no view);
    None if Django refuses its mix of sync and async handlers itself."""
    try:
        return getattr(cls, "view_is_async", False) is True
    except ImproperlyConfigured:
        return None


class db_parallelism:  # noqa: N801 - used like a function: @db_parallelism(3)
    """Run a view's (or a block's) ORM calls on up to ``n`` connections.

    As a decorator on an async view (function, ``View.as_view()`` result, or
    through ``method_decorator`` on a handler or on ``dispatch``)::

        @db_parallelism(3)
        async def dashboard(request): ...

    or around a block: ``async with db_parallelism(3): ...``.

    Inside a request served through ``DBSetMiddleware``, the decorator sets the
    request's parallelism to ``n`` for the rest of the request (a streaming body
    included), and the block form sets it for the block, then restores it - the
    decorator's ``n``, if a decorated view ran inside the block (an async
    middleware's block around the view, which exits before the body is sent).
    Elsewhere - the test clients, scripts - either opens a set of its own for
    the view or block. ``n`` is capped by ``ASGI_DBSET["MAX_PARALLELISM"]``.

    With ``snapshot=True``, every call of the view (or block), on every lane,
    reads one consistent snapshot of its database (see
    ``docs/transactions.md``); a snapshot already on is shared. The snapshot
    ends when the last view or block of the set that asked for it has
    returned (the decorator's: when the view returns); a block without
    ``snapshot=True`` never ends one.

    Blocks open at once in one set (gathered helpers) share its parallelism
    and statement timeout: the last one entered sets them, and when every
    block has left the set has the settings it had before the first.
    """

    def __init__(
        self,
        n: int,
        *,
        statement_timeout: float | Unset | None = UNSET,
        snapshot: bool = False,
    ) -> None:
        if callable(n):
            # A bare @db_parallelism hands the view itself over as n.
            raise TypeError(
                "db_parallelism takes the number of connections first: write "
                "@db_parallelism(3) above `async def`, not a bare @db_parallelism "
                f"(it was given {getattr(n, '__qualname__', n)!r})."
            )
        self.n = validate_parallelism(n, what="db_parallelism(n)")
        _validate_snapshot(snapshot, "db_parallelism(snapshot=...)")
        self.snapshot = snapshot
        if not isinstance(statement_timeout, Unset):
            validate_statement_timeout(
                statement_timeout, what="db_parallelism(statement_timeout=...)"
            )
        self.statement_timeout = statement_timeout
        # One stack per task, so one instance may be entered concurrently.
        # What each entry changed, to restore on exit (None: it opened the set).
        self._entered: ContextVar[
            tuple[tuple[ConnectionSet, _Previous | None], ...]
        ] = ContextVar("asgi_dbset.db_parallelism", default=())

    def __repr__(self) -> str:
        return f"db_parallelism({self.n}{', snapshot=True' * self.snapshot})"

    def __call__(self, view: F) -> F:
        if not callable(view):
            raise TypeError(
                f"@db_parallelism({self.n}) decorates an async view; got {view!r}. "
                f"Write @db_parallelism({self.n}) directly above `async def`."
            )
        if iscoroutinefunction(view):
            pass
        elif _is_method_decorator_dummy(view):
            self._check_method()
        elif (instance := _bound_view(view)) is not None:
            return self._wrap_sync_method(view, instance)  # type: ignore[return-value]
        else:
            self._refuse(getattr(view, "__qualname__", repr(view)))

        @functools.wraps(view)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            return await self._run(view, args, kwargs)

        wrapper.db_parallelism = self.n  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    def _refuse(self, name: str) -> NoReturn:
        raise TypeError(
            f"@db_parallelism({self.n}) needs an async view, but {name} is "
            f"synchronous. Write it as `async def` and use the async ORM "
            f"(aget, acount, async for ...), or remove the decorator: a sync "
            f"view runs its queries on one connection."
        )

    def _check_method(self) -> None:
        """method_decorator(), as the class is defined: refuse a sync view now,
        where it can be told, rather than on each request."""
        decorated = _decorated_by_method_decorator()
        if decorated is None:
            return  # (checked on each call, below)
        method, owner = decorated
        if iscoroutinefunction(method):
            return
        if isinstance(owner, type):
            # By name on the class (name="dispatch"): the class is complete.
            if _is_async_view(owner) is False:
                self._refuse(owner.__qualname__)
        elif getattr(method, "__name__", None) != "dispatch":
            # A sync handler makes its view sync (Django wants all of one kind);
            # only dispatch, sync in async views too, waits for its class.
            self._refuse(getattr(method, "__qualname__", repr(method)))

    def _wrap_sync_method(
        self, bound: Callable[..., Any], instance: object
    ) -> Callable[..., Any]:
        """method_decorator(), on a call: a sync method (``dispatch``) of
        *instance*, an async class-based view, which returns the handler's
        coroutine."""

        @functools.wraps(bound)
        def wrapper(*args: Any, **kwargs: Any) -> Awaitable[Any]:
            # Before the view runs: a sync view's response would not be awaited.
            if not _is_async_view(type(instance)):
                self._refuse(type(instance).__qualname__)
            return self._run(bound, args, kwargs)

        wrapper.db_parallelism = self.n  # type: ignore[attr-defined]
        return wrapper

    async def _run(
        self, view: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        async def call() -> Any:
            result = view(*args, **kwargs)
            # A sync dispatch returns the handler's coroutine: the parallelism
            # holds until it has run.
            if inspect.isawaitable(result):
                return await result
            return result

        dbset = active_set()
        if dbset is not None:
            # The request's settings from here on, streaming body included:
            # also what every block open now (an async middleware's around
            # the view, which exits before Django sends the body) restores.
            n = min(self.n, conf.MAX_PARALLELISM)
            dbset.parallelism = n
            for block in dbset.open_blocks:
                block.parallelism = n
            if not isinstance(self.statement_timeout, Unset):
                dbset.statement_timeout = self.statement_timeout
                for block in dbset.open_blocks:
                    block.statement_timeout = self.statement_timeout
            if self.snapshot:
                # For the view's own calls: the view holds the snapshot (one
                # already on is shared) until it returns, so its transactions
                # end then, before Django returns the request's own connection
                # (a streaming body's calls come after) - unless another holder
                # is still in it.
                dbset.begin_snapshot()
                try:
                    return await call()
                finally:
                    await dbset.end_snapshot()
            return await call()
        async with self:
            return await call()

    async def __aenter__(self) -> ConnectionSet:
        n = min(self.n, conf.MAX_PARALLELISM)
        dbset = active_set()
        previous: _Previous | None = None
        if dbset is not None:
            found = BlockSettings(dbset.parallelism, dbset.statement_timeout)
            dbset.open_blocks.append(found)
            previous = (found, self.snapshot)
            dbset.parallelism = n
            if not isinstance(self.statement_timeout, Unset):
                dbset.statement_timeout = self.statement_timeout
            if self.snapshot:
                dbset.begin_snapshot()
        else:
            dbset = connection_set(
                parallelism=n,
                statement_timeout=self.statement_timeout,
                snapshot=self.snapshot,
            )
            await dbset.__aenter__()
        self._entered.set((*self._entered.get(), (dbset, previous)))
        return dbset

    async def __aexit__(self, *exc_info: object) -> None:
        *rest, (dbset, previous) = self._entered.get()
        self._entered.set(tuple(rest))
        if previous is None:
            await dbset.__aexit__(*exc_info)
        elif not dbset.closed:
            found, holds_snapshot = previous
            try:
                # Only a block that asked for the snapshot lets go of it; the
                # last holder ends it (before its lanes may go back).
                if holds_snapshot:
                    await dbset.end_snapshot()
            finally:
                blocks = dbset.open_blocks
                at = next(i for i, block in enumerate(blocks) if block is found)
                del blocks[at]
                if at < len(blocks):
                    # A block entered after this one is still open (a
                    # concurrent task's): the settings it set stay, and it
                    # restores what this block found when it exits in turn.
                    later = blocks[at]
                    later.parallelism = found.parallelism
                    later.statement_timeout = found.statement_timeout
                else:
                    dbset.parallelism = found.parallelism
                    dbset.statement_timeout = found.statement_timeout
