"""One consistent snapshot of each database, shared by every lane of a set.

With ``db_parallelism(n, snapshot=True)`` the calls of a block read the
database as it was at one instant, whichever lane runs them - as
``pg_dump -j`` does: the first lane to run a call of an alias opens a
``REPEATABLE READ READ ONLY`` transaction and exports its snapshot
(``pg_export_snapshot()``); every other lane imports it (``SET TRANSACTION
SNAPSHOT``) before its first call of that alias. Each alias has a snapshot
of its own: two databases are never read at one instant together.

All of it runs on the lanes' threads (:meth:`Snapshot.enter` before a call,
:meth:`Snapshot.after_call` after one, :func:`leave` when the snapshot ends or
the connection goes back to its pool), so a lane's connection only ever does
one thing at a time. The transactions are the library's own: lane 0 does not
report them as the request's (see :mod:`.transactions`), and they all end
before any connection returns to its pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from django.db.backends.base.base import BaseDatabaseWrapper
from psycopg import sql

from .errors import SnapshotError

#: The attribute that marks a Django connection wrapper as inside a snapshot.
MARK = "_asgi_dbset_snapshot"
# Set on a wrapper in a snapshot whose connection Django closed meanwhile
# (connection.close(), connections.close_all() in code run in the block).
_CLOSED = "_asgi_dbset_snapshot_closed"
# The methods of a Django connection wrapper that its close(), commit() and
# rollback() call; replaced on a wrapper while it is in a snapshot.
_DJANGO_CLOSE = "_close"
_DJANGO_COMMIT = "_commit"
_DJANGO_ROLLBACK = "_rollback"
# Every importer's statements after its import go behind this savepoint, so
# a failed statement (a write, say) is undone without ending the snapshot.
_SAVEPOINT = "asgi_dbset_snapshot"
# The longest a lane waits for the exporting lane to publish the snapshot.
_EXPORT_WAIT = 30.0
_SET_ISOLATION = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"


class _Export:
    """One alias's snapshot as its exporting lane publishes it."""

    __slots__ = ("gone", "published", "snapshot_id")

    def __init__(self) -> None:
        self.published = threading.Event()
        #: Set before ``published``; None once published means withdrawn.
        self.snapshot_id: str | None = None
        #: The exporting connection was closed: no lane can import it any more.
        self.gone = False


class Snapshot:
    """The snapshot of each alias a set's lanes share; thread-safe."""

    __slots__ = ("_exports", "_lock", "ended")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Set (on the set's loop) as its set ends it, before any lane leaves
        #: it: a connection still marked with it afterwards may leave it.
        self.ended = False
        # alias -> its export, from the moment a lane claims it
        self._exports: dict[str, _Export] = {}

    def __repr__(self) -> str:
        return f"<Snapshot of {sorted(self._exports) or 'no database yet'}>"

    def enter(self, wrapper: BaseDatabaseWrapper) -> bool:
        """On a lane's thread, before a call of ``wrapper.alias``: put the
        connection inside this snapshot, if it is not already. True when
        this connection exported the snapshot: it must stay in it (and in
        the set) while the snapshot is on, for the lanes that import it."""
        if getattr(wrapper, MARK, None) is self:
            if getattr(wrapper, _CLOSED, False):
                # Its transaction ended with the connection: a read on the
                # connection Django opened since would not be of the snapshot.
                # Refused until the snapshot ends, as Django refuses a query
                # after a close inside transaction.atomic().
                raise SnapshotError(_closed_message(wrapper.alias))
            # (Sync code of the request's thread - sync_to_async, which the
            # set does not see - may have left a failure behind, as a call
            # may: undone before this call, as after_call does.)
            _undo_failure(wrapper)
            return False
        if getattr(wrapper, MARK, None) is not None:
            leave(wrapper)  # an earlier snapshot's transaction
        if wrapper.in_atomic_block or (
            wrapper.connection is not None and not wrapper.autocommit
        ):
            # The request's thread holds a transaction of its own (under
            # TestCase, say): the call runs in it, as on stock Django.
            return False
        # Connected before it claims an export: a lane that cannot connect
        # never keeps the others waiting for a snapshot it will not make.
        wrapper.ensure_connection()
        wrapper.set_autocommit(False)
        setattr(wrapper, MARK, self)
        try:
            # (Django's errors, as the call's own queries raise them.)
            with wrapper.wrap_database_errors:
                exported = self._join(wrapper.connection, wrapper.alias)
                wrapper.connection.execute(f"SAVEPOINT {_SAVEPOINT}")
        except BaseException:
            leave(wrapper)
            raise
        export = self._exports.get(wrapper.alias) if exported else None
        # Code in the block may call Django's close(), commit() or rollback()
        # on this connection: see _ending_snapshot and _keeping_snapshot.
        close = _ending_snapshot(wrapper, getattr(wrapper, _DJANGO_CLOSE), export)
        setattr(wrapper, _DJANGO_CLOSE, close)
        setattr(wrapper, _DJANGO_COMMIT, _keeping_snapshot(wrapper))
        setattr(wrapper, _DJANGO_ROLLBACK, _keeping_snapshot(wrapper))
        return exported

    def _join(self, conn: psycopg.Connection[Any], alias: str) -> bool:
        """Begin *conn*'s transaction in the snapshot of *alias*: export it
        if no lane has claimed that (True), else import it once it is
        published (False)."""
        deadline = time.monotonic() + _EXPORT_WAIT
        while True:
            with self._lock:
                export = self._exports.get(alias)
                exporting = export is None
                if export is None:
                    export = self._exports[alias] = _Export()
            if exporting:
                self._export(conn, alias, export)
                return True
            if not export.published.wait(max(0.0, deadline - time.monotonic())):
                raise SnapshotError(
                    f"asgi_dbset: the snapshot of database {alias!r} was not "
                    f"exported within {_EXPORT_WAIT:.0f} s."
                )
            if export.snapshot_id is not None:
                if export.gone:
                    raise SnapshotError(_closed_message(alias))
                conn.execute(_SET_ISOLATION)
                conn.execute(
                    sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                        sql.Literal(export.snapshot_id)
                    )
                )
                return False
            # Withdrawn: its exporter's call failed before anyone read the
            # snapshot, so a new one is still one instant for every read.

    def _export(
        self, conn: psycopg.Connection[Any], alias: str, export: _Export
    ) -> None:
        try:
            conn.execute(_SET_ISOLATION)
            row = conn.execute("SELECT pg_export_snapshot()").fetchone()
            export.snapshot_id = str(row[0]) if row else None
            if export.snapshot_id is None:
                raise SnapshotError(
                    f"asgi_dbset: PostgreSQL exported no snapshot of database {alias!r}."
                )
        except BaseException:
            # The failure is this call's alone: the next lane to need the
            # snapshot exports it (waiting lanes retry at once).
            with self._lock:
                if self._exports.get(alias) is export:
                    del self._exports[alias]
            raise
        finally:
            export.published.set()

    @staticmethod
    def after_call(wrapper: BaseDatabaseWrapper, cursor_call: bool) -> None:
        """On a lane's thread, after a call: undo a failed statement of the
        call, so the connection stays in the snapshot for the next one. After
        a chunk of an open cursor, move the savepoint past it: a rollback to
        a savepoint closes every cursor declared after it."""
        conn = wrapper.connection
        if getattr(wrapper, MARK, None) is None or conn is None or conn.closed:
            return
        if getattr(wrapper, _CLOSED, False):
            return  # (a connection opened since, outside the snapshot)
        if not _undo_failure(wrapper) and cursor_call:
            conn.execute(f"RELEASE SAVEPOINT {_SAVEPOINT}; SAVEPOINT {_SAVEPOINT}")


def _undo_failure(wrapper: BaseDatabaseWrapper) -> bool:
    """On the wrapper's thread, in the snapshot: undo what a failure left on
    it, as autocommit would have (True if there was one) - a failed
    statement, and Django's mark of a failed ``atomic(savepoint=False)``.
    Outside any atomic block, that is the outermost one, which Django's
    ``delete()``, ``bulk_create()`` and the like enter: in autocommit it is a
    transaction of its own, rolled back, and the next query runs; in the
    snapshot's transaction it has no savepoint, and Django only marks the
    connection (needs_rollback), refusing every later query of the request."""
    conn = wrapper.connection
    if conn is None or conn.closed:
        return False
    failed = conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
    marked = wrapper.needs_rollback and not wrapper.in_atomic_block
    if not (failed or marked):
        return False
    with wrapper.wrap_database_errors:
        conn.execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
    if marked:
        wrapper.needs_rollback = False
    return True


def leave(wrapper: BaseDatabaseWrapper) -> None:
    """On the wrapper's thread: end its snapshot transaction, if it is in one,
    and give the connection back its autocommit."""
    if getattr(wrapper, MARK, None) is None:
        return
    delattr(wrapper, MARK)
    for method in (_DJANGO_CLOSE, _DJANGO_COMMIT, _DJANGO_ROLLBACK):
        wrapper.__dict__.pop(method, None)  # (Django's own again)
    wrapper.__dict__.pop(_CLOSED, None)
    conn = wrapper.connection
    if conn is None or conn.closed or conn.broken:
        return
    conn.rollback()  # (read only: there is nothing to commit)
    if not wrapper.in_atomic_block:
        # (A failed atomic(savepoint=False)'s mark goes with the rollback:
        # see _undo_failure.)
        wrapper.needs_rollback = False
    wrapper.set_autocommit(True)


def _ending_snapshot(
    wrapper: BaseDatabaseWrapper, close: Callable[[], Any], export: _Export | None
) -> Callable[[], Any]:
    """Django's ``_close`` of *wrapper*, which first ends its snapshot
    transaction and marks the snapshot gone from it (and, if it exported the
    snapshot, for the lanes that have not imported it yet)."""

    def _close() -> Any:
        setattr(wrapper, _CLOSED, True)
        if export is not None:
            export.gone = True
        conn = wrapper.connection
        if conn is not None and not conn.closed and not conn.broken:
            try:
                conn.rollback()  # (read only: there is nothing to commit)
            except psycopg.Error:
                pass  # the pool discards or rolls back what it gets back
        return close()

    return _close


def _keeping_snapshot(wrapper: BaseDatabaseWrapper) -> Callable[[], None]:
    """Django's ``_commit`` and ``_rollback`` of *wrapper* while it is in a
    snapshot. To the request the connection is in autocommit, where Django's
    commit() and rollback() change nothing and the next query runs: so they
    keep the snapshot's transaction (ending it would leave the set's next
    calls reading live, and their writes rolled back silently when the
    snapshot ends), undoing only a failed statement, as after_call does."""

    def keep() -> None:
        conn = wrapper.connection
        if conn is None or conn.closed or conn.broken:
            return
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            with wrapper.wrap_database_errors:
                conn.execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")

    return keep


def _closed_message(alias: str) -> str:
    return (
        f"asgi_dbset: a connection of database {alias!r} was closed inside a "
        "consistent snapshot (db_parallelism(..., snapshot=True)) - "
        "connection.close() or connections.close_all() in code run in the "
        "block - and the snapshot's transaction ended with it: a read on a new "
        "connection would not be of the snapshot, so it is refused until the "
        "snapshot block ends (as Django refuses a query after a close inside "
        "transaction.atomic()). Close connections outside the snapshot block."
    )


def in_snapshot(wrapper: BaseDatabaseWrapper) -> bool:
    return getattr(wrapper, MARK, None) is not None
