"""``aiterator()`` cursors that outlived their connection set.

A cursor pinned to an extra lane is closed with that lane's connection when
the set ends. Its generator is remembered here, so that resuming it raises a
clear error instead of a database one.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

from .errors import OrphanedIteratorError

#: aiterator() generators whose cursor was closed with a lane's connection.
orphaned_cursors: weakref.WeakSet[types.GeneratorType[Any, None, None]] = (
    weakref.WeakSet()
)


#: Some cursor was ever orphaned in this process: until then no call needs
#: check_cursor() (WeakSet membership is Python code, and ORM calls are many).
ever_orphaned = False


def orphan(gen: types.GeneratorType[Any, None, None]) -> None:
    """Remember that *gen*'s cursor was closed with its set's lane."""
    global ever_orphaned
    ever_orphaned = True
    orphaned_cursors.add(gen)


def check_cursor(gen: object) -> None:
    """Refuse to resume an aiterator() whose cursor went with its set."""
    if gen in orphaned_cursors:
        raise OrphanedIteratorError(
            "This aiterator() was opened inside a connection set that has ended, "
            "and its cursor was closed with that set's connection. Finish the "
            "iteration inside the set (for a streaming response, iterate in the "
            "response body while the request is open), or fetch the rows first."
        )
