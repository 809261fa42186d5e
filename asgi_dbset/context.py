"""The context variables of the library: the active connection set, and the
transaction block (``asgi_dbset.atomic``) calls are made in.

Visible in the task that set them and in every task created inside it
(asyncio copies the context at task creation), which is how ``asyncio.gather``
children reach them. Code running on a lane sees no set: see :mod:`.lanes`.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .blocks import Block
    from .dbset import ConnectionSet

current_set: ContextVar[ConnectionSet | None] = ContextVar(
    "asgi_dbset.current_set", default=None
)

#: The innermost transaction block entered here (each knows the one around it).
current_block: ContextVar[Block | None] = ContextVar(
    "asgi_dbset.current_block", default=None
)
