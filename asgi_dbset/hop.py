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
  moves ``Local`` storage to the thread (asgiref 3.13): the call sees the
  caller's active timezone, language and urlconf;
- the exception the caller is handling, as the context of one the call raises.

A no-op call on a request's thread costs 299 k instructions through
``SyncToAsync`` and 164 k through :func:`hop` (``python -m bench.diagnose
hop``: valgrind, asgiref 3.13, Python 3.11).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import sys
from collections.abc import Callable
from concurrent.futures import CancelledError as FutureCancelledError
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

from asgiref.sync import AsyncToSync, SyncToAsync, _restore_context

T = TypeVar("T")


def _executors_var() -> contextvars.ContextVar[Any] | None:
    # The context variable behind asgiref's ``AsyncToSync.executors`` Local
    # (``Local._storage._data``, asgiref 3.9 to 3.13), if it is there.
    storage = vars(AsyncToSync.executors).get("_storage")
    var = getattr(storage, "__dict__", {}).get("_data")
    return var if isinstance(var, contextvars.ContextVar) else None


_EXECUTORS_VAR = _executors_var()


def sync_thread_above() -> Executor | None:
    """``AsyncToSync.executors.current``: the executor of the sync thread that
    awaits this code through ``async_to_sync``, if any.

    The Local's read raises and catches an ``AttributeError`` (with the Local's
    repr) when nothing is stored: about 2 us, per call. Nothing is stored in a
    context whose variable was never set - every request of an ASGI server -
    so that case is answered from the variable alone."""
    if _EXECUTORS_VAR is not None and _EXECUTORS_VAR.get(None) is None:
        return None
    return getattr(AsyncToSync.executors, "current", None)


class BlockContext:
    """What ``SyncToAsync.thread_sensitive_context`` holds inside an
    ``asgi_dbset.atomic()`` block on an extra lane: asgiref's key for the
    executor of thread-sensitive sync code, which runs on the block's lane
    (see :mod:`.blocks`). The library's own hops to the request's thread see
    through it to *request_context*, the request's ``ThreadSensitiveContext``
    (None outside a request: asgiref then chooses its thread of the loop).
    """

    __slots__ = ("__weakref__", "_exited", "request_context")

    def __init__(self, request_context: object) -> None:
        self.request_context = request_context
        # (asgiref 3.13 reads it: a context that has exited refuses calls.)
        self._exited = False


def asgiref_context() -> object:
    """``SyncToAsync.thread_sensitive_context`` as set here: the request's
    ``ThreadSensitiveContext``, a block's key, or None. (Typed ``object``:
    asgiref types the variable as its own class, which a key is not.)"""
    return SyncToAsync.thread_sensitive_context.get(None)


def thread_sensitive_context() -> Any:
    """The request's ``ThreadSensitiveContext`` for calls made here, if any:
    ``SyncToAsync.thread_sensitive_context``, seen through a block's key."""
    context = asgiref_context()
    if type(context) is BlockContext:
        return context.request_context
    return context


#: Set on a request's ``ThreadSensitiveContext`` by :func:`release`: True,
#: or EXITED once the context has exited.
_RELEASED = "_asgi_dbset_released"
EXITED = "exited"


def release(request_context: object, *, exited: bool = False) -> None:
    """The request of *request_context* is done with its thread (its
    connections are being returned, or the context has *exited*): the calls
    made in that context from now on - by tasks the app started and did not
    await, which kept it in their context variables - run on asgiref's
    shared thread, as without a context (a Starlette app without the
    middleware), not on the request's thread, where they would open a
    pooled connection nobody returns, nor on a new thread asgiref would make
    for the exited context (the same, once per task).

    Once it has exited, a thread asgiref has made for it since - for the
    same tasks' own ``sync_to_async`` (``transaction.set_autocommit(False)``)
    - is the one their calls run on from then on: on stock Django both run on
    that thread, and the ORM calls inside the transaction the task's sync code
    opened there, never on the shared thread in autocommit. (Nothing is added
    to asgiref's map: its entries would last as long as the contexts.)"""
    setattr(request_context, _RELEASED, EXITED if exited else True)


def _shared_executor() -> Executor:
    """asgiref's thread for thread-sensitive code without a context: the
    loop's sync thread (under ``async_to_sync``), else its one shared thread."""
    loop = asyncio.get_running_loop()
    shared: Executor | None = AsyncToSync.loop_thread_executors.get(loop)
    return shared or SyncToAsync.single_thread_executor


def request_thread_executor(outer: object) -> Executor | None:
    """The executor ``SyncToAsync(thread_sensitive=True)`` would run a call on
    for the current caller: the sync thread above (*outer*,
    ``AsyncToSync.executors.current`` read by the caller), else the thread of
    the caller's ``ThreadSensitiveContext``, made here on the context's first
    call exactly as ``SyncToAsync.__call__`` makes it (one ``ThreadPoolExecutor``
    of one thread, in asgiref's own map, which the context's exit shuts down).

    None when asgiref has to choose itself - no such context (asgiref then
    uses the loop's or its one shared thread), or one that has exited (asgiref
    refuses the call) - so the caller then goes through ``SyncToAsync``. The
    order of the checks is ``SyncToAsync.__call__``'s.
    """
    if outer:
        return outer  # type: ignore[return-value]
    context = thread_sensitive_context()
    if context is None or getattr(context, "_exited", False):
        return None
    executors = SyncToAsync.context_to_thread_executor
    released = getattr(context, _RELEASED, None)
    if released is not None:
        # (See release(): asgiref's choice without a context - unless, after
        # the exit, asgiref's own sync_to_async of these tasks has made the
        # context a thread, which their transactions are on.)
        executor = executors.get(context) if released == EXITED else None
        return executor or _shared_executor()
    executor = executors.get(context)
    if executor is None:
        executor = executors[context] = ThreadPoolExecutor(max_workers=1)
    return executor


def entering(context: contextvars.Context, fn: Callable[[], T]) -> Callable[[], T]:
    """*fn*, made to run in *context* on whatever thread calls it, with
    asgiref's ``Local`` storage moved onto that thread (for ``SyncToAsync``,
    which copies a context of its own: its ``context=`` is asgiref 3.11+)."""

    def restored() -> T:
        _restore_context(context)
        return fn()

    return functools.partial(context.run, restored)


async def hop(
    loop: asyncio.AbstractEventLoop,
    executor: Executor | None,
    context: contextvars.Context,
    fn: Callable[[], T],
) -> T:
    """Run ``fn()`` in *context* on *executor*'s thread and return its result.

    Without an executor (no thread-sensitive context, or one that has
    exited: see :func:`request_thread_executor`), the call goes through
    ``SyncToAsync``, which chooses the thread (or refuses the call) as for
    stock Django.

    Cancelling the caller cancels as ``SyncToAsync`` does: a call not started
    never starts; a running one goes on (a lane's job marks it abandoned),
    but first an ``async_to_sync`` task it runs is cancelled and awaited, and
    if that task absorbs the cancellation, the call's result is awaited and
    returned. Nothing is copied back from *context*.
    """
    __traceback_hide__ = True  # (Django's debug page skips this frame)
    if executor is None:
        key = asgiref_context()
        if type(key) is not BlockContext:
            return await SyncToAsync(entering(context, fn))()
        # Inside a block on an extra lane: asgiref chooses as for the request,
        # never the block's lane (which would take this call off lane 0).
        token = SyncToAsync.thread_sensitive_context.set(
            key.request_context  # type: ignore[arg-type]
        )
        try:
            return await SyncToAsync(entering(context, fn))()
        finally:
            SyncToAsync.thread_sensitive_context.reset(token)
    task_context: list[asyncio.Task[Any]] = []
    handling = sys.exc_info()[1]
    # The call's outcome comes back in one callback on the loop, straight into
    # this future: none of wrap_future's chaining, which reads the thread's
    # future back under its lock four times.
    done: asyncio.Future[T] = loop.create_future()
    returned = False

    def in_thread() -> T:
        nonlocal returned
        __traceback_hide__ = True
        local = SyncToAsync.threadlocal
        local.main_event_loop = loop
        local.main_event_loop_pid = os.getpid()
        local.task_context = task_context
        _restore_context(context)
        if handling is None:
            result = fn()
        else:
            try:
                raise handling
            except BaseException:
                result = fn()
        # A result goes back from here, before the worker's own bookkeeping.
        returned = True
        _hand_back(loop, done, result, None)
        return result

    def after_thread(running: Future[T]) -> None:
        # Every other outcome goes back once the thread's future has it, as
        # wrap_future hands it over: an exception after the thread unwound
        # (so its traceback is complete before the caller raises it), a call
        # the executor dropped unrun (shut down with cancel_futures), one that
        # failed before in_thread began. The caller awaits *done* alone: it
        # must be settled on every path. (Runs on the thread that ended the
        # future, after in_thread returned if it did.)
        if not returned:
            exc = FutureCancelledError() if running.cancelled() else running.exception()
            _hand_back(loop, done, None, exc)

    running = executor.submit(context.run, in_thread)
    running.add_done_callback(after_thread)
    try:
        return await done
    except asyncio.CancelledError:
        running.cancel()  # a call not started never starts
        if not task_context:
            raise
        # SyncToAsync.__call__'s rule for a call inside async_to_sync.
        task = task_context[0]
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            raise  # the task took the cancellation: so does the caller
        # (asgiref raises here if its own future of the call is done already,
        # which it is not yet: that future completes through the loop, after
        # this resumes. The call's thread may be done, so the rule is not
        # read off ``running``.)
        return await asyncio.wrap_future(running, loop=loop)


def _hand_back(
    loop: asyncio.AbstractEventLoop,
    done: asyncio.Future[Any],
    result: Any,
    exc: BaseException | None,
) -> None:
    """From the call's thread: settle *done* on its loop, unless the caller
    gave up (cancelled it) or the loop has closed."""
    if exc is not None and type(exc) is FutureCancelledError:
        exc = asyncio.CancelledError(*exc.args)  # (as wrap_future converts it)
    try:
        loop.call_soon_threadsafe(_settle, done, result, exc)
    except RuntimeError:  # the loop has closed: nobody waits
        pass


def _settle(done: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if done.done():  # (the caller gave up, or the outcome is in already)
        return
    if exc is None:
        done.set_result(result)
        return
    try:
        done.set_exception(exc)
    except TypeError as refused:  # (StopIteration: a future refuses it)
        done.set_exception(refused)


async def run_as_stock(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``await SyncToAsync(func)(*args, **kwargs)``, through :func:`hop`: on the
    thread stock Django runs it on, in a copy of the caller's context whose
    changes are copied back after, as asgiref does."""
    outer = sync_thread_above()
    context = contextvars.copy_context()
    try:
        return await hop(
            asyncio.get_running_loop(),
            request_thread_executor(outer),
            context,
            functools.partial(func, *args, **kwargs),
        )
    finally:
        _restore_context(context)
