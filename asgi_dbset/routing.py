"""Route Django's async ORM entry points through the active connection set.

Every async entry point of the ORM ends in ``sync_to_async(f)(...)``, with the
name ``sync_to_async`` looked up at call time in the globals of four Django
modules (see ``shared/notes/django-internals.md``). :func:`install` points that
name, in those modules only, at :func:`sync_to_async` below, which asks the
active :class:`~.dbset.ConnectionSet` to run the call. Without an active set it
is asgiref's ``sync_to_async``, plus one context-variable read.

The rest of Django's request path hops to the request's thread the same way:
signal dispatch (``request_started``, ``request_finished``), ``MiddlewareMixin``
middleware, sync views, template rendering, the response's close. Inside a set
those hops go to that same thread through the lanes' leaner hop
(:func:`request_path_sync_to_async`): never to a lane, never through the
scheduler, only cheaper than asgiref's. A module of that path that cannot be
routed keeps asgiref's hops: nothing changes but the cost.
"""

from __future__ import annotations

import functools
import importlib
import types
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from asgiref.sync import iscoroutinefunction
from asgiref.sync import sync_to_async as stock_sync_to_async

from . import cursors
from .context import current_set
from .cursors import check_cursor
from .hop import BlockContext, asgiref_context, run_as_stock

#: The modules whose ``sync_to_async`` global is routed.
MODULES = (
    "django.db.models.query",
    "django.db.models.base",
    "django.db.models.fields.related_descriptors",
    "django.contrib.contenttypes.fields",
)

#: The modules of Django's request path whose hops run through the leaner hop
#: inside a set (:func:`request_path_sync_to_async`).
REQUEST_PATH_MODULES = (
    "django.core.handlers.asgi",
    "django.core.handlers.base",
    "django.dispatch.dispatcher",
    "django.utils.deprecation",
)


def sync_to_async(
    func: Callable[..., Any] | None = None,
    *,
    thread_sensitive: bool = True,
    context: Any = None,
    executor: Any = None,
) -> Any:
    """asgiref's ``sync_to_async`` for Django's ORM modules, set-aware.

    Only the plain thread-sensitive form is routed; any other form is
    asgiref's own. Django calls what this returns at once, in the same
    context (``await sync_to_async(f)(...)``), so the active set is read here.
    Without a set, the call is asgiref's own, unwrapped; with a set that runs
    calls as stock Django does (parallelism 1), it runs where asgiref would
    run it, through the lanes' leaner hop (:func:`~.hop.run_as_stock`).
    """
    if (
        func is None
        or not thread_sensitive
        or context is not None
        or executor is not None
    ):
        return _asgirefs(func, thread_sensitive, context, executor)

    dbset = current_set.get()
    if not cursors.ever_orphaned:
        if dbset is None:
            return stock_sync_to_async(func)
        if dbset.passes_through:
            return functools.partial(run_as_stock, func)

    def routed(*args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        if args and type(args[0]) is types.GeneratorType:
            check_cursor(args[0])
        if dbset is None:
            return stock_sync_to_async(func)(*args, **kwargs)
        if dbset.passes_through:
            return run_as_stock(func, *args, **kwargs)
        return dbset.call(func, args, kwargs)

    return routed


def request_path_sync_to_async(
    func: Callable[..., Any] | None = None,
    *,
    thread_sensitive: bool = True,
    context: Any = None,
    executor: Any = None,
) -> Any:
    """asgiref's ``sync_to_async`` for Django's request path (not the ORM).

    Inside a set, the plain thread-sensitive form runs where asgiref would run
    it - the request's thread, in a copy of the caller's context copied back
    after - through :func:`~.hop.run_as_stock`; it never goes to a lane, so
    what the set schedules is unchanged. Any other form, or no set, is
    asgiref's own.
    """
    if (
        func is None
        or not thread_sensitive
        or context is not None
        or executor is not None
        or current_set.get() is None
        # Inside a block on an extra lane, asgiref runs it on the block's
        # lane, inside the block's transaction (see .block_threads).
        or type(asgiref_context()) is BlockContext
    ):
        return _asgirefs(func, thread_sensitive, context, executor)
    # SyncToAsync's own check, kept: an async method given by mistake (an
    # ``async def process_request`` on a MiddlewareMixin) fails here as it
    # does on stock Django, instead of returning an unawaited coroutine.
    if (
        not callable(func)
        or iscoroutinefunction(func)
        or iscoroutinefunction(getattr(func, "__call__", func))  # noqa: B004
    ):
        raise TypeError("sync_to_async can only be applied to sync functions.")
    return functools.partial(run_as_stock, func)


def _asgirefs(
    func: Callable[..., Any] | None, thread_sensitive: bool, context: Any, executor: Any
) -> Any:
    """The form asgiref's ``sync_to_async`` returns, for the forms not routed."""
    if context is None:
        # (asgiref < 3.11 has no context=: pass it only when it was given.)
        return stock_sync_to_async(
            func,  # type: ignore[arg-type]
            thread_sensitive=thread_sensitive,
            executor=executor,
        )
    return stock_sync_to_async(
        func,  # type: ignore[arg-type]
        thread_sensitive=thread_sensitive,
        context=context,
        executor=executor,
    )


def _routable_modules() -> list[str]:
    from django.apps import apps

    # Generic relations exist only with contenttypes installed; importing the
    # module without it fails.
    contenttypes = apps.is_installed("django.contrib.contenttypes")
    return [name for name in MODULES if contenttypes or ".contenttypes." not in name]


_installed = False


def ensure_installed() -> None:
    """Install once per process; cheap after the first call."""
    global _installed
    if not _installed:
        install()
        _installed = True


def install() -> list[str]:
    """Route the ORM modules' ``sync_to_async``, and the request path's;
    idempotent.

    Returns the ORM modules that could not be routed (an unexpected Django
    layout); the system check ``asgi_dbset.W001`` reports them. (A request
    path module that cannot be routed keeps asgiref's hops: no semantics
    depend on it.)
    """
    _route(REQUEST_PATH_MODULES, request_path_sync_to_async)
    return _route(_routable_modules(), sync_to_async)


def _route(names: Sequence[str], replacement: Callable[..., Any]) -> list[str]:
    """Point each module's ``sync_to_async`` at *replacement* where it is
    asgiref's; return the modules where it is neither."""
    missing = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            missing.append(name)
            continue
        current = getattr(module, "sync_to_async", None)
        if current is replacement:
            continue
        if current is not stock_sync_to_async:
            missing.append(name)
            continue
        module.sync_to_async = replacement  # type: ignore[attr-defined]
    return missing
