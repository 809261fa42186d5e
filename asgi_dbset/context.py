"""The context variables of the library: the active connection set, and the
transaction block (``asgi_dbset.atomic``) calls are made in.

Visible in the task that set them and in every task created inside it
(asyncio copies the context at task creation), which is how ``asyncio.gather``
children reach them. Code running on a lane sees no set: see :mod:`.lanes`.
"""

from __future__ import annotations

from collections.abc import Iterator
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


def blocks_around(block: Block | None) -> Iterator[Block]:
    """The transaction blocks a call made in *block*'s context is in,
    innermost first (*block*: usually ``current_block.get()``).

    A block already left is around no call: a task created inside it that
    goes on afterwards still has it in its context (asyncio copied it), but
    its calls run outside it, as stock Django's after the block's commit -
    not on its old lane, which may be back in the pool or held by a new block
    of the set (whose rollback would undo them)."""
    while block is not None:
        if not block.ended:
            yield block
        block = block.outer
