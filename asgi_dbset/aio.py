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
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            continue
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
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller's cancellation (the task itself is the caller's
            # alone: it is cancelled only if the loop cancels everything).
            cancelled = cancelled or not task.cancelled()
        except BaseException:
            pass  # (the opening failed: read off the task below)
    if task.cancelled():
        raise asyncio.CancelledError
    failed = task.exception()
    if failed is not None:
        if cancelled:
            raise asyncio.CancelledError  # (nothing was opened)
        raise failed
    result = task.result()
    if cancelled:
        await finish_shielded(undo(result))
        raise asyncio.CancelledError
    return result
