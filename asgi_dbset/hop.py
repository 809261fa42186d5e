"""The thread hop of a lane: what asgiref's ``SyncToAsync`` does to run one
call on another thread, less what a lane has already.

Django builds a ``SyncToAsync`` per ORM call. Each one copies the wrapped
function's metadata, chooses an executor, copies the caller's context, awaits
the thread under ``asyncio.shield`` and copies the context back. A lane has
its own executor (its worker, or the request's thread), its own private copy
of the context and its own cancellation (its job). So it hands its call to the
executor itself, and keeps only what code inside the call relies on:

- asgiref's thread-local (``SyncToAsync.threadlocal``): an ``async_to_sync``
  inside the call (an async signal receiver, say) runs its coroutine on this
  loop, and the caller's cancellation reaches that coroutine's task;
- asgiref's context restore on the thread (``_restore_context``), which also
  moves ``Local`` storage to the thread (asgiref 3.10+): the call sees the
  caller's active timezone, language and urlconf;
- the exception the caller is handling, as the context of one the call raises.

A no-op call on a request's thread costs 297 k instructions through
``SyncToAsync`` and 166 k through :func:`hop` (valgrind, asgiref 3.13).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import sys
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from asgiref.sync import AsyncToSync, SyncToAsync, _restore_context

T = TypeVar("T")


def request_thread_executor(outer: object) -> Executor | None:
    """The executor ``SyncToAsync(thread_sensitive=True)`` would run a call on
    for the current caller, when it exists already: the sync thread above
    (*outer*, ``AsyncToSync.executors.current`` read by the caller), else the
    thread of the caller's ``ThreadSensitiveContext``.

    None when asgiref has to choose itself - it makes the request's thread on
    its first call, and refuses calls after the context has exited - so the
    caller then goes through ``SyncToAsync``. The order of the checks is
    ``SyncToAsync.__call__``'s.
    """
    if outer:
        return outer  # type: ignore[return-value]
    context = SyncToAsync.thread_sensitive_context.get(None)
    if context is None or getattr(context, "_exited", False):
        return None
    return SyncToAsync.context_to_thread_executor.get(context)


async def hop(
    loop: asyncio.AbstractEventLoop,
    executor: Executor,
    context: contextvars.Context,
    fn: Callable[[], T],
) -> T:
    """Run ``fn()`` in *context* on *executor*'s thread and return its result.

    If the caller is cancelled, an ``async_to_sync`` task the call is running
    is cancelled too and the cancellation propagates at once; the call itself
    is the caller's to deal with (a lane's job, which marks it abandoned).
    Nothing is copied back from *context*: it is the caller's private copy.
    """
    task_context: list[asyncio.Task[Any]] = []
    handling = sys.exc_info()[1]

    def in_thread() -> T:
        local = SyncToAsync.threadlocal
        local.main_event_loop = loop
        local.main_event_loop_pid = os.getpid()
        local.task_context = task_context
        _restore_context(context)
        if handling is None:
            return fn()
        try:
            raise handling
        except BaseException:
            return fn()

    future = loop.run_in_executor(executor, context.run, in_thread)
    try:
        return await future
    except asyncio.CancelledError:
        if task_context:
            task_context[0].cancel()
        raise


async def run_as_stock(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``await SyncToAsync(func)(*args, **kwargs)``, through :func:`hop`: on the
    thread stock Django runs it on, in a copy of the caller's context whose
    changes are copied back after, as asgiref does."""
    executor = request_thread_executor(getattr(AsyncToSync.executors, "current", None))
    if executor is None:
        return await SyncToAsync(func)(*args, **kwargs)
    context = contextvars.copy_context()
    try:
        return await hop(
            asyncio.get_running_loop(),
            executor,
            context,
            functools.partial(func, *args, **kwargs),
        )
    finally:
        _restore_context(context)
