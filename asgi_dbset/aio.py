"""asyncio helpers for release paths."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
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
