"""The context variable that holds the active connection set.

Visible in the task that opened the set and in every task created inside it
(asyncio copies the context at task creation), which is how ``asyncio.gather``
children reach it. Code running on a lane sees None: see :mod:`.lanes`.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .dbset import ConnectionSet

current_set: ContextVar[ConnectionSet | None] = ContextVar(
    "asgi_dbset.current_set", default=None
)
