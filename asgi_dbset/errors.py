"""Errors raised by asgi_dbset.

Those a caller may meet around an ORM call subclass Django's own errors
(``OperationalError``: a call not run, a query refused, a snapshot not
joined; ``InternalError``: a write in a snapshot; ``TransactionManagementError``:
a transaction left open), so the handlers that already catch those catch them
too.
"""

from __future__ import annotations

from django.db import InternalError, OperationalError
from django.db.transaction import TransactionManagementError


class OrphanedIteratorError(RuntimeError):
    """An ``aiterator()`` was resumed after the connection set that ran it ended."""

    __module__ = "asgi_dbset"


class CallNotRunError(OperationalError):
    """An ORM call did not run: its connection set ended before it had a lane."""

    __module__ = "asgi_dbset"


class QueryRefusedError(OperationalError):
    """A query was not sent: its call's caller gave up, or its set closed on
    an error, while the call was still running."""

    __module__ = "asgi_dbset"


class SnapshotError(OperationalError):
    """A lane could not join its set's snapshot: it was not exported, or code
    in the snapshot block closed the connection that was in it; or a call of
    another set needed a connection that is in the snapshot, or a set was
    opened inside another set's snapshot."""

    __module__ = "asgi_dbset"


class SnapshotWriteError(InternalError):
    """A write inside ``db_parallelism(snapshot=True)``: the snapshot's
    transactions are read only. Its ``__cause__`` is PostgreSQL's error."""

    __module__ = "asgi_dbset"


class TransactionLeftOpenError(TransactionManagementError):
    """A function run by ``sync_to_lane()`` returned inside a transaction it
    opened; the transaction was rolled back."""

    __module__ = "asgi_dbset"
