"""Sync code inside ``asgi_dbset.atomic()`` runs on the block's lane.

On stock Django, sync code run inside ``transaction.atomic()`` - a service
function under ``sync_to_async``, a signal's sync receivers under ``asend()``,
``acreate_user()`` - runs on the request's thread, inside the transaction that
thread's connection holds: it sees the block's rows, its writes commit or roll
back with the block, and it never waits for the block's own row locks. A block
that holds an extra lane has its transaction on that lane's connection, which
only the lane's thread may use. So inside it, asgiref's thread-sensitive
``sync_to_async`` runs the code on the block's lane, after the block's calls
already handed to it - as the request's one thread would run it after them:

- on entering a block that holds an extra lane, asgiref's thread-sensitive
  context (``SyncToAsync.thread_sensitive_context``) becomes a
  :class:`~.hop.BlockContext` whose executor, in asgiref's own map, is
  :data:`ON_BLOCK_LANES`; on leaving, it is the request's again;
- asgiref asks that executor to run the code (on the loop, in the caller's
  context), and it runs it as one call of the set on the lane of the blocks
  around the caller; no block around it any more (a task that outlived the
  block), or blocks only on lane 0: on the request's thread, as before;
  blocks of several databases on different lanes: refused, as one function
  cannot be inside transactions of two connections;
- the library's own hops to the request's thread see through the block's key
  (:func:`~.hop.thread_sensitive_context`): lane 0 stays the request's thread;
- the code sees no set, as all code on a lane: async code it runs under
  ``async_to_sync`` (an async signal receiver, a block entered there) runs
  its ORM calls on the lane's thread, inside the block, as stock Django runs
  them on its one thread - never queued on the lane that thread holds.

Under ``async_to_sync`` (a sync view's async helper), asgiref runs
thread-sensitive code on the sync caller's thread before it asks any context:
a block entered there is on lane 0, that thread (``ConnectionSet.open_block``),
so the key is never set.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor, Future, InvalidStateError
from contextvars import Token
from typing import TYPE_CHECKING, Any, TypeVar

from asgiref.sync import AsyncToSync, SyncToAsync
from django.db import transaction

from .context import blocks_around, current_block, current_set
from .hop import BlockContext, asgiref_context, request_thread_executor

if TYPE_CHECKING:
    from .blocks import Block

T = TypeVar("T")

# The tasks running sync code on block lanes (asyncio keeps only weak
# references to tasks).
_running: set[asyncio.Future[Any]] = set()


class BlockLaneExecutor(Executor):
    """asgiref's executor for thread-sensitive sync code inside blocks on
    extra lanes; decides per call, in the caller's context (see the module
    docstring). One for the process: what it decides comes from the context."""

    def __repr__(self) -> str:
        return f"<BlockLaneExecutor running={len(_running)}>"

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        dbset = current_set.get()
        lanes: list[Any] = []
        inner: Block | None = None
        for block in blocks_around(current_block.get()):
            if block.dbset is dbset and block.lane not in lanes:
                lanes.append(block.lane)
                inner = inner or block
        if len(lanes) > 1:
            raise transaction.TransactionManagementError(
                "asgi_dbset: sync code (sync_to_async) inside asgi_dbset.atomic() "
                "blocks of several databases, which run on different connections: "
                "one function cannot run inside all of them. Call it outside the "
                "inner block, or split it into one function per database."
            )
        if inner is None or inner.lane.index == 0:
            # No block around the caller any more (a task that outlived it),
            # or the block is on the request's own connection: the request's
            # thread, as asgiref would choose without the block.
            return _request_thread(asgiref_context()).submit(fn, *args, **kwargs)
        return _on_lane(inner, fn, args, kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass  # (it owns no thread: the lanes' workers are the set's)


#: The executor of every block's key.
ON_BLOCK_LANES = BlockLaneExecutor()


def enter(block: Block) -> Token[Any] | None:
    """*block* has been entered: if it holds an extra lane, thread-sensitive
    sync code in its context runs there from now on. Returns what
    :func:`leave` takes (None: nothing changed)."""
    if block.lane.index == 0:
        return None
    request_context = asgiref_context()
    if type(request_context) is BlockContext:
        return None  # (a block around this one has set the key already)
    # Outside a request (a script under asyncio.run: no ThreadSensitiveContext,
    # request_context None) too: asgiref would run the code on its thread of
    # the loop, outside the block's transaction.
    key = BlockContext(request_context)
    # (asgiref's map holds its keys weakly: the entry goes with the block's
    # context.)
    SyncToAsync.context_to_thread_executor[key] = ON_BLOCK_LANES  # type: ignore[index]
    return SyncToAsync.thread_sensitive_context.set(key)  # type: ignore[arg-type]


def leave(token: Token[Any] | None) -> None:
    """The block :func:`enter` returned *token* for has been left."""
    if token is not None:
        SyncToAsync.thread_sensitive_context.reset(token)


def _request_thread(key: object) -> Executor:
    if type(key) is BlockContext and key.request_context is None:
        # No request context (a script): asgiref's own choice without one,
        # in SyncToAsync.__call__'s order - the sync thread of the loop (under
        # async_to_sync), else its one shared thread.
        loop = asyncio.get_running_loop()
        shared: Executor | None = AsyncToSync.loop_thread_executors.get(loop)
        return shared or SyncToAsync.single_thread_executor
    executor = request_thread_executor(None)
    if executor is None:
        # The request's context has exited: asgiref refuses such a call.
        raise RuntimeError(
            "ThreadSensitiveContext has exited. Tasks created inside a context "
            "with an executor must finish before it exits."
        )
    return executor


def _on_lane(
    block: Block, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Future[T]:
    """Run ``fn(*args, **kwargs)`` as a call of *block*'s set on its lane;
    the future asgiref waits on has its outcome."""
    future: Future[T] = Future()
    fn = _seeing_no_set(fn)

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return  # (its caller gave up before it started, as asgiref's)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller through asgiref
            future.set_exception(exc)
        else:
            future.set_result(result)

    # Untimed: the set's statement timeout is for its ORM calls; sync code
    # runs without it on lane 0 (the block's at parallelism 1, or outside
    # blocks), and so at every parallelism.
    task = asyncio.ensure_future(
        block.dbset.run_on_lane(block.lane, block.alias, run, (), untimed=True)
    )
    _running.add(task)
    task.add_done_callback(functools.partial(_ran, future))
    return future


def _seeing_no_set(fn: Callable[..., T]) -> Callable[..., T]:
    """asgiref's call of the sync code (a partial of
    ``SyncToAsync.thread_handler``, whose last argument is the code, run in
    asgiref's copy of the caller's context), made to run the code with no set
    in that context, as all code on a lane runs (see ``Lane.run``): an
    ``async_to_sync`` inside it (an async signal receiver, a block entered
    there) then runs its ORM calls on this very thread, inside the block's
    transaction, as stock Django runs them on its one thread. Seeing the set,
    they would queue on the block's lane, which is busy running the code that
    waits for them: for ever."""
    handler = getattr(fn, "func", None)
    # (A subclass's thread_handler - channels' database_sync_to_async - takes
    # the same arguments.)
    if (
        type(fn) is not functools.partial
        or not isinstance(getattr(handler, "__self__", None), SyncToAsync)
        or getattr(handler, "__name__", None) != "thread_handler"
        or not fn.args
    ):
        raise RuntimeError(
            "asgi_dbset: this asgiref's SyncToAsync hands the block's executor a "
            f"call asgi_dbset does not know ({fn!r}); sync code inside "
            "asgi_dbset.atomic() cannot run there. Install an asgiref release "
            "asgi_dbset supports (3.9 to 3.13), or run the code with "
            "`await asgi_dbset.sync_to_lane(fn)()`."
        )
    code = functools.partial(_without_set, fn.args[-1])
    return functools.partial(fn.func, *fn.args[:-1], code, **fn.keywords)


def _without_set(code: Callable[[], T]) -> T:
    # (Reset before asgiref copies the context back: the caller keeps its set.)
    token = current_set.set(None)
    try:
        return code()
    finally:
        current_set.reset(token)


def _ran(future: Future[Any], task: asyncio.Future[Any]) -> None:
    _running.discard(task)
    exc = asyncio.CancelledError() if task.cancelled() else task.exception()
    if exc is None or future.done():
        return
    # The lane never ran it (the set closed, the block's lane was lost).
    try:
        future.set_exception(exc)
    except InvalidStateError:  # (cancelled by its caller meanwhile)
        pass
