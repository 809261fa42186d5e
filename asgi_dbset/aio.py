"""asyncio helpers for release paths."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def finish_shielded(coro: Coroutine[Any, Any, T]) -> T:
    """Run *coro* to its end even if the caller is cancelled meanwhile.

    A release path must not stop halfway: on cancellation this keeps waiting
    for *coro*, then re-raises ``CancelledError`` to the caller.
    """
    task = asyncio.ensure_future(coro)
    cancelled = await _outlast_cancellation(task)
    result = task.result()  # (its own exception, if it raised one)
    if cancelled:
        raise asyncio.CancelledError
    return result


async def open_or_undo(
    coro: Coroutine[Any, Any, T], undo: Callable[[T], Coroutine[Any, Any, None]]
) -> T:
    """Run *coro* (an opening: a BEGIN, a SAVEPOINT) to its end even if the
    caller is cancelled meanwhile, and return its result; if the caller was
    cancelled, undo what it opened (``await undo(result)``, to its end) and
    re-raise ``CancelledError`` instead.

    An opening that runs on another thread goes on after its caller is
    cancelled; whoever gives up on it must still close what it opened, or the
    thread is left inside it.
    """
    task = asyncio.ensure_future(coro)
    cancelled = await _outlast_cancellation(task)
    if cancelled and (task.cancelled() or task.exception() is not None):
        raise asyncio.CancelledError  # (nothing was opened)
    result = task.result()
    if cancelled:
        await finish_shielded(undo(result))
        raise asyncio.CancelledError
    return result


async def _outlast_cancellation(task: asyncio.Future[Any]) -> bool:
    """Wait until *task* is done, whatever happens to the caller meanwhile;
    True if the caller was cancelled. (The task is the caller's alone: it is
    cancelled itself only if the loop cancels everything.)"""
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = cancelled or not task.cancelled()
        except BaseException:
            pass  # (the task failed: the caller reads it off the task)
    return cancelled
