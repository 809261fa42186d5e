"""Lanes: the places a connection set runs an ORM call, one call at a time each.

- :class:`RequestLane` (lane 0) is the request's own thread and connection,
  reached through ``sync_to_async(thread_sensitive=True)`` exactly as stock
  Django reaches it. The set never opens or returns its connection.
- :class:`PooledLane` (lanes 1..n) pairs a borrowed :class:`~.workers.Worker`
  thread with a connection leased from the alias's psycopg pool. Everything a
  pooled lane does with its connection - lease, queries, return - runs on its
  worker thread, in order, so the connection is never returned while a query
  runs on it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import sys
import threading
import time
import types
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Executor
from typing import Any

import psycopg
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from . import snapshots, stats
from .budget import budget
from .cancellation import Job
from .context import blocks_around, current_block, current_set
from .errors import SnapshotError, SnapshotWriteError
from .hop import hop, request_thread_executor
from .snapshots import Snapshot
from .transactions import TransactionReports
from .workers import Worker, workers

logger = logging.getLogger("asgi_dbset")

_thread = threading.local()

#: Held while the library wraps a pool's getconn/putconn (a lane's thread
#: bounding its lease, OpenTelemetry's exporter timing the pool): each reads
#: the method and writes its wrapper in one step, so neither wrapper is lost.
POOL_PATCH_LOCK = threading.Lock()

# The longest a pooled lane's thread waits for lane 0's report before it gives
# the call back to the set (lane 0 reports when it starts its call; this only
# bounds a thread that lane 0's own work keeps waiting).
_CLEARANCE_WAIT = 10.0


class NotRunError(Exception):
    """A call handed to a pooled lane did not run there; the set queues it again."""


class LeaseRefusedError(NotRunError):
    """A call reached a pooled lane whose lease had failed; it did not run."""


class NotClearedError(NotRunError):
    """A call handed to a pooled lane on credit was not cleared by lane 0's
    report (lane 0 is inside a transaction, of any alias, or its call did not
    run); it did not run."""


_NO_ALIASES: frozenset[str] = frozenset()
_NO_REFUSALS: Mapping[str, Callable[[str, str], Callable[..., Any]]] = {}


class Lane:
    """A place to run one call at a time: its scheduling state, which the
    owning set changes on its event loop only, and the thread side of a call
    (:meth:`run`)."""

    __slots__ = (
        "alias",
        "broken",
        "calls",
        "exported",
        "index",
        "jobs",
        "leased",
        "reserved",
    )

    def __init__(self, index: int, alias: str | None = None) -> None:
        self.index = index
        #: The alias whose connection this lane holds; None for lane 0 (any alias).
        self.alias = alias
        #: Jobs handed to the lane and not over yet (lane 0 may have several
        #: queued on its thread; a pooled lane has at most one).
        self.jobs = 0
        self.calls = 0
        #: The lane has its connection (lane 0 always has the request's).
        self.leased = alias is None
        #: Never hand it a call again: its lease failed or its connection died.
        self.broken = False
        #: Held by a transaction block (asgi_dbset.atomic): only its calls run here.
        self.reserved = False
        #: The last snapshot this lane's connection exported (written on the
        #: lane's thread before its call returns, read on the loop after).
        self.exported: Snapshot | None = None

    @property
    def busy(self) -> bool:
        return self.jobs > 0

    def __repr__(self) -> str:
        state = "busy" if self.busy else "idle"
        return (
            f"<{type(self).__name__} {self.index} {self.alias or '*'} {state} "
            f"calls={self.calls}>"
        )

    def _executor(self, outer: object) -> Executor | None:
        """The executor of the lane's thread; None when asgiref must make it."""
        raise NotImplementedError

    def _blocks_elsewhere(self, alias: str) -> frozenset[str]:
        """The databases, other than *alias*, whose ``asgi_dbset.atomic()``
        blocks around the caller run on another lane (read on the loop, in the
        caller's context): this lane's connections of them are outside those
        blocks' transactions."""
        block = current_block.get()
        if block is None:
            return _NO_ALIASES
        return frozenset(
            each.alias
            for each in blocks_around(block)
            if each.lane is not self and each.alias != alias
        )

    def _request_state_elsewhere(self) -> frozenset[str]:
        """The databases whose queries only the request's own connection may
        run (a schema-per-tenant backend's: budget.keeps_request_state); this
        lane's connections of them never had the request's state."""
        return _NO_ALIASES

    def _before(
        self,
        wrapper: BaseDatabaseWrapper,
        wrappers: list[BaseDatabaseWrapper],
        job: Job,
        timeout_ms: int | None,
        clearance: int | None,
        scope: str,
    ) -> None:
        """Runs on the lane's thread before each call, with the thread's Django
        connection of the call's alias and all of the thread's wrappers;
        ``clearance`` is the generation of lane 0's report the call must wait
        for, if any, to clear *scope* (the call's alias, or every alias)."""

    def _after(
        self,
        wrapper: BaseDatabaseWrapper,
        wrappers: list[BaseDatabaseWrapper],
        timeout_ms: int | None,
    ) -> None:
        """Runs on the lane's thread after each call."""

    async def run(
        self,
        job: Job,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        alias: str,
        on_abandoned_end: Callable[[Lane, Job], None],
        timeout_ms: int | None = None,
        *,
        clearance: int | None = None,
        outer: object = None,
        snapshot: Snapshot | None = None,
        local_timeout: bool = False,
        scope: str | None = None,
        cursor_call: bool = False,
        untimed: frozenset[str] = frozenset(),
    ) -> Any:
        """Run ``func(*args, **kwargs)`` as *job* on this lane's thread.

        Returns when the call has finished. If the caller is cancelled while
        the call runs (and marks the job abandoned), ``on_abandoned_end`` is
        called on the loop once the thread is done with it. With a
        *clearance* (a pooled lane only), the thread first waits for lane 0's
        report of that generation, and raises :class:`NotClearedError` unless
        it clears the call's alias. *outer* is the caller's
        ``AsyncToSync.executors.current`` (lane 0 runs on that thread when
        there is one). With a *snapshot*, the call runs inside it (see
        .snapshots); without one, a connection still in an earlier snapshot
        leaves it first. With *local_timeout* (the alias is behind a
        transaction pooler), the statement timeout holds for the call's own
        transaction only (:func:`run_with_local_timeout`). *scope*: what the
        clearance must clear, if not *alias* (see ``Target.scope``);
        *cursor_call*: the call runs a chunk of an open cursor; *untimed*:
        databases behind a transaction pooler, whose connections the call
        opens besides *alias*'s get no session timeout.
        """
        if local_timeout and timeout_ms is not None:
            # (No session setting at all. A call of any alias - sync_to_lane -
            # runs its code's own transactions, which a transaction around it
            # would change: behind a pooler it runs without the timeout.)
            local_ms = timeout_ms if scope is None else None
            timeout_ms = None
        else:
            local_ms = None
        loop = asyncio.get_running_loop()
        # The call runs in a private copy of the caller's context, never copied
        # back: code on a lane does not see the set (an async_to_sync inside it
        # runs its ORM calls on this very thread, as stock Django does), and
        # nothing set on the lane leaks into the caller, even on cancellation.
        context = contextvars.copy_context()
        context.run(current_set.set, None)
        # Databases whose queries this lane's connections must not run (read
        # on the loop, in the caller's context), each with its refusal.
        elsewhere = self._blocks_elsewhere(alias)
        request_only = self._request_state_elsewhere()
        refusals = (
            {
                **dict.fromkeys(elsewhere, _outside_block),
                **dict.fromkeys(request_only, _without_request_state),
            }
            if elsewhere or request_only
            else _NO_REFUSALS  # (most calls: no dict to build)
        )

        def call() -> Any:
            if not job.begin(time.perf_counter()):
                return None  # its caller gave up before it started
            wrapper = None
            wrappers: list[BaseDatabaseWrapper] = []
            try:
                wrapper, wrappers = thread_wrappers(alias)
                self._before(
                    wrapper, wrappers, job, timeout_ms, clearance, scope or alias
                )
                held = getattr(wrapper, snapshots.MARK, None)
                if held is not None and held is not snapshot and not held.ended:
                    # The connection is in the snapshot of another set still
                    # on (sets share lane 0's thread): leaving it would end
                    # that set's snapshot under its calls; refused instead.
                    raise SnapshotError(_SNAPSHOT_OF_ANOTHER_SET)
                if snapshot is not None:
                    if snapshot.enter(wrapper):
                        self.exported = snapshot
                elif held is not None:
                    leave_snapshot(wrapper)
                # Django's execute_wrapper(), without its generator: every
                # query of the call passes job.guard - on any connection of
                # this thread, whatever alias Django routes it to - and only
                # those queries.
                guard = job.guard  # (one bound method: removed by identity)
                for each in wrappers:
                    each.execute_wrappers.append(guard)
                # A database whose transaction block runs on another lane (a
                # query on this thread's connection of it would run outside
                # that transaction, where Django runs it inside: a receiver
                # writing there, say), or whose state (the tenant's schema)
                # only the request's own connection has (a query here would
                # use another schema's tables): its queries are refused, never
                # sent.
                refused = (
                    [each for each in wrappers if each.alias in refusals]
                    if refusals
                    else ()
                )
                refuses = [refusals[each.alias](alias, each.alias) for each in refused]
                for each, refuse in zip(refused, refuses, strict=True):
                    each.execute_wrappers.append(refuse)
                # The timeout bounds every query of the call, not only those of
                # *alias*: another database's connection (opened by the call
                # when it first queries it) gets it at its first query, and
                # loses it when the call ends.
                timed = (
                    [w for w in wrappers if w is not wrapper and w.alias not in untimed]
                    if timeout_ms is not None and len(wrappers) > 1
                    else ()
                )
                if timed:
                    assert timeout_ms is not None
                    each_timed = _timed_statements(timeout_ms)
                    for each in timed:
                        each.execute_wrappers.append(each_timed)
                try:
                    if local_ms is not None:
                        return run_with_local_timeout(
                            wrapper, local_ms, func, args, kwargs
                        )
                    return func(*args, **kwargs)
                except DatabaseError as exc:
                    if snapshot is not None and isinstance(
                        exc.__cause__, psycopg.errors.ReadOnlySqlTransaction
                    ):
                        raise SnapshotWriteError(
                            _snapshot_write_refused(exc, wrapper.in_atomic_block)
                        ) from exc
                    raise
                finally:
                    for each in timed:
                        remove_execute_wrapper(each, each_timed)
                        reset_statement_timeout(each)
                    for each, refuse in zip(refused, refuses, strict=True):
                        remove_execute_wrapper(each, refuse)
                    for each in wrappers:
                        remove_execute_wrapper(each, guard)
            finally:
                try:
                    if wrapper is not None:
                        if snapshot is not None:
                            Snapshot.after_call(wrapper, cursor_call)
                        self._after(wrapper, wrappers, timeout_ms)
                finally:
                    if job.end():
                        try:
                            loop.call_soon_threadsafe(on_abandoned_end, self, job)
                        except RuntimeError:  # the loop has closed
                            pass

        return await hop(loop, self._executor(outer), context, call)


_SNAPSHOT_OF_ANOTHER_SET = (
    "asgi_dbset: this call would run on the request's own connection (the "
    "thread-sensitive thread, which every connection set of the request, or of "
    "the script's thread, shares), and that connection is in the consistent "
    "snapshot of another connection set still open (db_parallelism(..., "
    "snapshot=True) or connection_set(snapshot=True)): running the call there "
    "would end that snapshot under the other set's calls. Use one set: inside "
    "the snapshot write `async with db_parallelism(n):`, which changes the set "
    "in use, rather than open a connection_set() of its own; or make this set's "
    "calls after the snapshot has ended."
)


def remove_execute_wrapper(
    wrapper: BaseDatabaseWrapper, hook: Callable[..., Any]
) -> None:
    """Take *hook*, which the library appended before a call, off *wrapper*'s
    execute wrappers after it, by identity - not the last one, as Django's
    ``execute_wrapper()`` does: the call may have appended hooks of its own
    since (a ``connection_created`` receiver installs one on the connection
    the call opened, as Scout APM does), and they stay, as on stock Django,
    which wraps no call."""
    hooks = wrapper.execute_wrappers
    if hooks and hooks[-1] is hook:  # (nothing appended since: most calls)
        hooks.pop()
        return
    for index in range(len(hooks) - 1, -1, -1):
        if hooks[index] is hook:
            del hooks[index]
            return


def _timed_statements(timeout_ms: int) -> Callable[..., Any]:
    """An execute wrapper setting the statement timeout on the connection
    before its query (once per connection: see set_statement_timeout)."""

    def timed(
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: dict[str, Any],
    ) -> Any:
        set_statement_timeout(context["connection"], timeout_ms)
        return execute(sql, params, many, context)

    return timed


def _outside_block(call_alias: str, alias: str) -> Callable[..., Any]:
    """An execute wrapper refusing every query: see ``Lane._blocks_elsewhere``."""

    def refuse(*ignored: Any) -> Any:
        raise transaction.TransactionManagementError(
            f"asgi_dbset: a call for database {call_alias!r} made inside "
            f"asgi_dbset.atomic(using={alias!r}) queried {alias!r} (from code it "
            "runs: a signal receiver, a router, a method), on a connection "
            "outside that block's transaction; Django would have run the query "
            "inside it. Run that code on the block's connection - "
            "`await asgi_dbset.sync_to_lane(fn)()` inside the block - or make "
            "the call outside the block."
        )

    return refuse


def _without_request_state(call_alias: str, alias: str) -> Callable[..., Any]:
    """An execute wrapper refusing every query: see ``Lane._request_state_elsewhere``."""

    def refuse(*ignored: Any) -> Any:
        raise transaction.TransactionManagementError(
            f"asgi_dbset: a call for database {call_alias!r}, run on a connection "
            f"of its own, queried {alias!r} (from code it runs: a signal "
            f"receiver, a router, a method); {alias!r}'s backend keeps "
            "per-request state (the tenant's schema) on the request's own "
            "connection only, so the query would have used another schema's "
            "tables. Run that code on the request's connection: put the call in "
            "a function of your own and `await sync_to_async(that_function)()`, "
            "or make the call with parallelism 1."
        )

    return refuse


def _snapshot_write_refused(exc: BaseException, in_block: bool) -> str:
    said = (
        f"{exc} - asgi_dbset: this call ran inside a consistent snapshot "
        "(db_parallelism(..., snapshot=True)), whose transactions are read only."
    )
    if in_block:
        # (A block runs in the snapshot only on lane 0, when it could not have
        # a lane of its own.)
        return (
            f"{said} Its asgi_dbset.atomic() block runs on the request's own "
            "connection, which is in the snapshot, because it could not have a "
            "lane of its own (parallelism 1, or no connection to spare). Enter "
            "the block outside the snapshot block, or give the set a parallelism "
            "above the lanes the snapshot uses."
        )
    return (
        f"{said} Move the write out of the snapshot block, or into "
        "`async with asgi_dbset.atomic():`."
    )


def thread_wrappers(
    alias: str,
) -> tuple[BaseDatabaseWrapper, list[BaseDatabaseWrapper]]:
    """This thread's Django connection of *alias*, and all of its connections
    (whose queries a call's guard must see, whatever alias Django routes them to)."""
    # (Looked up once: each lookup is an asgiref Local's. With one database,
    # the alias's wrapper is the thread's only one, known without
    # connections.all().)
    wrapper = connections[alias]
    if len(connections.settings) == 1:
        return wrapper, [wrapper]
    return wrapper, list(connections.all())


def in_transaction(wrappers: list[BaseDatabaseWrapper]) -> frozenset[str]:
    """The aliases whose connection of this thread (*wrappers*) is inside a
    transaction the program opened: an atomic block, or autocommit off."""
    aliases = _NO_ALIASES
    for w in wrappers:
        if w.in_atomic_block or (
            w.connection is not None
            and not w.autocommit
            # (A snapshot's transaction is the set's, not the request's.)
            and getattr(w, snapshots.MARK, None) is None
        ):
            aliases = aliases | {w.alias}
    return aliases


#: Execute wrappers found on an extra lane's connection just after its lease
#: opened it: hooks on every connection (a ``connection_created`` receiver's,
#: as Scout APM installs), which the extra lanes' queries pass too - by kind
#: (see _kind()), each with the most of that kind one connection had. Bounded
#: (kinds, not hooks: a receiver making a hook afresh for each connection
#: adds one kind, and holds nothing of the connections here).
_EVERY_CONNECTION_HOOKS: dict[Hashable, int] = {}
_EVERY_CONNECTION_HOOKS_MAX = 256


def _kind(hook: Callable[..., Any]) -> Hashable:
    """What makes a hook on lane 0's connection the one a receiver installed
    on every connection, though not the same object: a closure or a bound
    method made afresh for each connection (its code), a callable object
    (its class; hashable or not), a partial (its function's kind)."""
    if isinstance(hook, functools.partial):
        return ("partial", _kind(hook.func))
    func = getattr(hook, "__func__", hook)  # (a bound method's function)
    code: types.CodeType | None = getattr(func, "__code__", None)
    if code is not None:
        return code
    kind: type = type(hook)
    return kind


def _kinds(hooks: list[Callable[..., Any]]) -> dict[Hashable, int]:
    counts: dict[Hashable, int] = {}
    for hook in hooks:
        if getattr(hook, "__func__", None) is Job.guard:
            continue  # (a set's cancel guard: the library's own, on every lane)
        kind = _kind(hook)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def remember_every_connection_hooks(wrapper: BaseDatabaseWrapper) -> None:
    """On a lane's thread, after its lease: note *wrapper*'s execute wrappers."""
    remembered = _EVERY_CONNECTION_HOOKS
    for kind, count in _kinds(wrapper.execute_wrappers).items():
        if count > remembered.get(kind, 0) and (
            kind in remembered or len(remembered) < _EVERY_CONNECTION_HOOKS_MAX
        ):
            remembered[kind] = count


def watched(wrappers: list[BaseDatabaseWrapper]) -> frozenset[str]:
    """The aliases whose connection of this thread (*wrappers*) code is
    watching in a way no other connection is: ``CaptureQueriesContext`` and
    ``assertNumQueries`` (``force_debug_cursor``), an execute wrapper
    installed on this connection only (``with connection.execute_wrapper():``
    in a sync middleware, around its ``get_response``), or its own
    ``cursor()`` or ``chunked_cursor()`` replaced on the connection object
    (django-debug-toolbar's SQL panel records queries so). On
    stock Django every query of the request passes there; a query on an
    extra lane's connection would not, so the set keeps the calls on this
    lane while it is watched."""
    aliases = _NO_ALIASES
    for w in wrappers:
        # (Three attribute reads and two dict lookups per connection when
        # nothing watches.)
        watcher: tuple[str, Hashable]
        if w.force_debug_cursor:
            watcher = (_CAPTURE, None)
        elif w.execute_wrappers and (kind := _watching(w)) is not None:
            watcher = (_WRAPPER, kind)
        elif ("cursor" in (own := w.__dict__) or "chunked_cursor" in own) and (
            _cursor_watched(own)
        ):
            watcher = (_CURSOR, _kind(own.get("cursor") or own["chunked_cursor"]))
        else:
            continue
        aliases = aliases | {w.alias}
        if watcher not in _TOLD:
            _tell_watched(w.alias, watcher)
    return aliases


# What watches a connection: (_CAPTURE, None) - a query capture - or
# (_WRAPPER or _CURSOR, the kind of hook: see _kind()).
_CAPTURE, _WRAPPER, _CURSOR = "capture", "execute wrapper", "cursor"
#: The watchers _tell_watched() has logged: one line per process each. Bounded.
_TOLD: set[tuple[str, Hashable]] = set()
_TOLD_MAX = 64
_TOLD_LOCK = threading.Lock()


def _tell_watched(alias: str, watcher: tuple[str, Hashable]) -> None:
    """Log, once per process for each watcher, that *alias*'s calls run one
    at a time and what to do about it: otherwise a view that gathers its
    queries is only slower than expected, with nothing saying why."""
    if not logger.isEnabledFor(logging.INFO):
        return  # (Untold: a logger set to INFO later still hears of it.)
    with _TOLD_LOCK:
        # Once, though the lane-0 threads of several requests get here.
        if watcher in _TOLD or len(_TOLD) >= _TOLD_MAX:
            return
        _TOLD.add(watcher)
    how, kind = watcher
    if how == _CAPTURE:
        why = "its queries are captured (CaptureQueriesContext, assertNumQueries)"
        todo = "A test that counts queries wants them there: nothing to do"
    elif how == _CURSOR:
        why = f"its cursor() is replaced on the connection object ({_describe(kind)})"
        todo = (
            "A tool that sees each query so (django-debug-toolbar's SQL panel) is "
            "for development: turn it off where speed matters"
        )
    else:
        why = f"an execute wrapper is on it alone ({_describe(kind)})"
        todo = (
            "To let them run in parallel, install the hook from a "
            "connection_created receiver instead, so that every connection, the "
            "extra lanes' too, has it"
        )
    logger.info(
        "asgi_dbset: the ORM calls of %r stay on the request's own connection and "
        "run one at a time, as on stock Django, while %s: every query of the "
        "request passes there on stock Django, and one on another lane's "
        "connection would not. %s. (Said once per "
        "process for each watcher; such calls are counted in "
        "get_stats()['pinned_calls'].)",
        alias,
        why,
        todo,
    )


def _describe(kind: Hashable) -> str:
    """A hook's kind (see _kind()) as a person finds it in their code."""
    if isinstance(kind, tuple):
        return f"a partial of {_describe(kind[1])}"
    if isinstance(kind, types.CodeType):
        return f"{kind.co_qualname} in {kind.co_filename}:{kind.co_firstlineno}"
    if isinstance(kind, type):
        return f"an instance of {kind.__module__}.{kind.__qualname__}"
    return str(kind)


def _cursor_watched(own: dict[str, Any]) -> bool:
    # A tool's cursor() on the connection object watches it - unless it is
    # the stand-in Django's test cases put on the aliases a test may not
    # use: a refusal on that thread, not a watcher (it must not keep a test's
    # calls of every alias on lane 0).
    testcases = sys.modules.get("django.test.testcases")
    refusal = getattr(testcases, "_DatabaseFailure", None)
    return any(
        type(own[name]) is not refusal
        for name in ("cursor", "chunked_cursor")
        if name in own
    )


def _watching(wrapper: BaseDatabaseWrapper) -> Hashable | None:
    """The first kind of hook (see _kind()) by which *wrapper*'s execute
    wrappers watch it, or None."""
    # Unwatched only while each kind of hook is on this connection at most as
    # many times as a leased one had it: the same kind once more (a sync
    # middleware's own hook, which a receiver also appends to each
    # connection) sees each query once more on stock Django, where every
    # query passes this connection - not on an extra lane's.
    remembered = _EVERY_CONNECTION_HOOKS
    if wrapper.connection is None:
        # Not open yet: its connection_created receivers have appended
        # nothing here, so every hook on it is the application's own (one
        # of a receiver's kind too), which each query passes on stock.
        remembered = {}
    for kind, count in _kinds(wrapper.execute_wrappers).items():
        if count > remembered.get(kind, 0):
            return kind
    return None


def hand_over_queries(
    wrappers: list[BaseDatabaseWrapper], request_wrappers: list[BaseDatabaseWrapper]
) -> None:
    """On an extra lane's thread, under ``DEBUG``: move the queries its call
    logged on the thread's connections (*wrappers*) to the request thread's
    connections of the same alias (*request_wrappers*). On stock Django every
    query of the request is in the request thread's ``connection.queries``
    (which ``request_started`` resets); the lane's own lists are read by
    nobody, and would keep up to 9000 queries each."""
    targets = {w.alias: w for w in request_wrappers}
    for w in wrappers:
        if w.queries_log:
            target = targets.get(w.alias)
            if target is not None and target is not w:
                # (deque.extend: one step under the GIL, whatever the request's
                # thread appends meanwhile.)
                target.queries_log.extend(w.queries_log)
                w.queries_log.clear()


def guarded(
    job: Job, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[], Any]:
    """``func(*args, **kwargs)`` as *job*, for whatever thread runs it, with
    none of a lane's work but the cancel guard: every query it sends, on any
    of that thread's connections, passes ``job.guard``. Nothing runs if the
    caller gave up before the thread started it."""

    def call() -> Any:
        if not job.begin(time.perf_counter()):
            return None  # its caller gave up before it started
        try:
            _, wrappers = thread_wrappers(DEFAULT_DB_ALIAS)
            guard = job.guard  # (one bound method: removed by identity)
            for each in wrappers:
                each.execute_wrappers.append(guard)
            try:
                return func(*args, **kwargs)
            finally:
                for each in wrappers:
                    remove_execute_wrapper(each, guard)
        finally:
            job.end()

    return call


class RequestLane(Lane):
    """Lane 0: the request's own thread-sensitive thread and its connections."""

    __slots__ = ("reports",)

    def __init__(self) -> None:
        super().__init__(0)
        #: Where this lane's thread reports its transactions (see .transactions).
        self.reports = TransactionReports()

    def _executor(self, outer: object) -> Executor | None:
        return request_thread_executor(outer)

    def _before(
        self,
        wrapper: BaseDatabaseWrapper,
        wrappers: list[BaseDatabaseWrapper],
        job: Job,
        timeout_ms: int | None,
        clearance: int | None,
        scope: str,
    ) -> None:
        # The set may only use other connections while this thread's are
        # outside a transaction, and unwatched (see watched()): report it for
        # every call, since code the set does not see may have opened or
        # closed one on this thread since.
        self.reports.request_wrappers = wrappers
        if self.reports.post(
            job.generation, in_transaction(wrappers) | watched(wrappers)
        ):
            # Other lanes wait for this report: let them have the GIL now,
            # not after this thread has built its own query - theirs are
            # what the request waits for.
            time.sleep(0)
        if timeout_ms is not None:
            set_statement_timeout(wrapper, timeout_ms)

    def _after(
        self,
        wrapper: BaseDatabaseWrapper,
        wrappers: list[BaseDatabaseWrapper],
        timeout_ms: int | None,
    ) -> None:
        # The request's own connection outlives the set (Django returns it to
        # the pool itself): never leave the set's timeout on it. (Only a call
        # with a timeout sets one, and each such call resets it here.)
        if timeout_ms is not None:
            reset_statement_timeout(wrapper)


def _bounded_getconn(pool: Any, alias: str) -> None:
    """Make ``pool.getconn()`` wait at most the lane's lease timeout when it is
    called from a lane thread; other threads keep the pool's own timeout, and
    when they find the pool empty while sets hold extra lanes of *alias*,
    those sets return their idle ones (``scheduler.on_pool_pressure``).

    Django opens a pooled connection with ``pool.getconn()`` and no timeout,
    so this is the one place where a lane can bound its wait, and a request
    be seen waiting for its own connection, without copying Django's connect
    logic.
    """
    if getattr(pool.getconn, "_asgi_dbset_bounded", False):
        return
    with POOL_PATCH_LOCK:  # (no other wrapper of getconn is lost meanwhile)
        if getattr(pool.getconn, "_asgi_dbset_bounded", False):
            return
        original = pool.getconn

        def getconn(timeout: float | None = None) -> Any:
            if timeout is None:
                timeout = getattr(_thread, "lease_timeout", None)
                if timeout is None and budget.held(alias) and _empty(pool):
                    # A request's own connection (not a lease) would wait,
                    # maybe behind idle lanes: they go back first.
                    from .scheduler import on_pool_pressure

                    on_pool_pressure(alias)
            return original(timeout)

        getconn._asgi_dbset_bounded = True  # type: ignore[attr-defined]
        pool.getconn = getconn


def _empty(pool: Any) -> bool:
    """True when *pool* has no connection to hand out and may open no more."""
    stats = pool.get_stats()
    return not stats.get("pool_available", 0) and stats.get("pool_size", 0) >= getattr(
        pool, "max_size", 0
    )


class PooledLane(Lane):
    """A worker thread with a connection leased from ``alias``'s pool.

    The lease is queued on the worker the moment the lane is made
    (:meth:`start_lease`), and calls may be handed to the lane at once: the
    worker runs them after the lease, in order, so a call never waits for a
    round trip through the event loop between the lease and its query. A call
    queued behind a failed lease runs nothing and raises
    :class:`LeaseRefusedError` (the set queues it again).
    """

    __slots__ = ("_refused", "_wrappers", "reports", "worker")

    def __init__(
        self, index: int, alias: str, worker: Worker, reports: TransactionReports
    ) -> None:
        super().__init__(index, alias)
        self.worker = worker
        # Lane 0's reports, for calls handed to this lane on credit.
        self.reports = reports
        # Written by the lease and read by the calls after it, all on the
        # worker thread, in that order.
        self._refused: BaseException | None = None
        # The worker thread's Django connections, as its last job left them
        # (read by return_here() only while the worker has nothing to run).
        self._wrappers: list[BaseDatabaseWrapper] = []

    def __repr__(self) -> str:
        state = "busy" if self.busy else "idle"
        lease = "leased" if self.leased else "broken" if self.broken else "leasing"
        return (
            f"<PooledLane {self.index} {self.alias} {state} {lease} "
            f"calls={self.calls} on {self.worker.name}>"
        )

    def _executor(self, outer: object) -> Executor | None:
        return self.worker

    def _request_state_elsewhere(self) -> frozenset[str]:
        return budget.request_state_aliases()

    def _before(
        self,
        wrapper: BaseDatabaseWrapper,
        wrappers: list[BaseDatabaseWrapper],
        job: Job,
        timeout_ms: int | None,
        clearance: int | None,
        scope: str,
    ) -> None:
        if self._refused is not None:
            # Never let Django open the connection itself: it would wait the
            # pool's own timeout, not the lease's.
            raise LeaseRefusedError(str(self._refused))
        if clearance is not None and not self.reports.wait_clear(
            clearance, scope, _CLEARANCE_WAIT
        ):
            raise NotClearedError(
                f"lane 0 did not report {scope!r} outside a transaction"
            )
        if timeout_ms is None:
            reset_statement_timeout(wrapper)
        else:
            set_statement_timeout(wrapper, timeout_ms)

    def _after(
        self,
        wrapper: BaseDatabaseWrapper,
        wrappers: list[BaseDatabaseWrapper],
        timeout_ms: int | None,
    ) -> None:
        # A connection of a database other than the lane's that the call
        # opened here (a sync_to_lane function reading two databases, a
        # receiver) is no lane the budget counts: held until the lane goes
        # back, lanes holding one pool's connections would wait for another's
        # that lanes of other requests hold while they wait for the first -
        # until the pool's timeout. So it goes back when the call ends, unless
        # a transaction, a snapshot or a statement timeout still lives on it.
        if wrapper.queries_logged:  # (DEBUG: one settings read per call)
            hand_over_queries(wrappers, self.reports.request_wrappers)
        others = [
            w for w in wrappers if w.alias != self.alias and w.connection is not None
        ]
        if others:
            _return_all([w for w in others if _between_calls(w)], _return_connection)
        self._wrappers = [w for w in wrappers if w.connection is not None]
        conn = wrapper.connection
        if conn is None or conn.closed or conn.broken:
            # Never hand a dead connection to another call: the set returns
            # this lane (the pool discards its connection).
            self.broken = True

    def start_lease(
        self, lease_timeout: float, after_report: int | None = None
    ) -> asyncio.Future[None]:
        """Queue the lease on the worker thread and return at once; the future
        fails if no connection was had within ``lease_timeout`` seconds. With
        *after_report* (the generation of the call lane 0 runs now), the lease
        first waits for that call's report: the calls this lane is leased for
        wait for it anyway, and until it comes (lane 0's thread may be busy
        with code the set does not see) the lane holds no connection."""
        alias = self.alias
        assert alias is not None

        def lease() -> None:
            if after_report is not None:
                self.reports.wait_reported(after_report, _CLEARANCE_WAIT)
            wrapper = connections[alias]
            self._wrappers = [wrapper]
            _bounded_getconn(wrapper.pool, alias)  # type: ignore[attr-defined]
            # Bound only this lease: a connection to another alias that a call
            # opens later on this thread waits as stock Django would.
            _thread.lease_timeout = lease_timeout
            try:
                wrapper.ensure_connection()
            except BaseException as exc:
                self._refused = exc
                raise
            finally:
                _thread.lease_timeout = None
            remember_every_connection_hooks(wrapper)
            # Under DEBUG, what the lease's connection_created receivers sent
            # (a SET of their own) is logged here: queries of a connection
            # stock Django never opens (its request has one, whose receivers'
            # queries connection.queries lists once) - never handed over.
            wrapper.queries_log.clear()

        # The lease opens the connection, so Django's connection_created
        # receivers run in it: in a private copy of the context of the request
        # code that made the set lease (as stock runs them in the context of
        # the request's first query), not in the worker's own empty one.
        context = contextvars.copy_context()
        context.run(current_set.set, None)
        return asyncio.get_running_loop().run_in_executor(
            self.worker, context.run, lease
        )

    def return_here(self) -> bool:
        """Return the lane's connections to their pools from the calling
        thread, with no round trip to the worker, and give the worker back.

        Only for a lane whose worker has nothing queued or running (its lease
        and calls are over, as the set sees them), so no thread touches these
        connections meanwhile. Declines (False, nothing done) when returning
        one would take a query - a statement timeout to reset, a transaction
        for the pool to roll back - or when a connection is dead: then
        :meth:`return_on_worker` does it.
        """
        for wrapper in self._wrappers:
            conn = wrapper.connection
            if conn is None:
                continue
            if getattr(wrapper, _TIMEOUT_ATTR, None) is not None:
                return False
            if conn.closed or conn.broken:
                return False
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                return False
        _return_all(self._wrappers, _put_back)
        self._wrappers = []
        workers.release(self.worker)
        return True

    async def return_on_worker(
        self, cursors: Sequence[types.GeneratorType[Any, None, None]] = ()
    ) -> None:
        """Return every connection of the worker thread to its pool, after the
        calls already queued on it (closing *cursors*, ``aiterator()``
        generators open on it, first), and give the worker back. A
        transaction still open there (a block that outlived its set) is
        rolled back."""

        def return_all() -> None:
            for gen in cursors:
                try:
                    gen.close()  # closes its server-side cursor
                except Exception:
                    logger.debug("asgi_dbset: error closing an iterator", exc_info=True)
            return_thread_connections()

        try:
            await asyncio.get_running_loop().run_in_executor(self.worker, return_all)
        finally:
            self._wrappers = []
            workers.release(self.worker)


_TIMEOUT_ATTR = "_asgi_dbset_statement_timeout"


_SET_LOCAL_TIMEOUT = "SELECT set_config('statement_timeout', %s, true)"


def run_with_local_timeout(
    wrapper: BaseDatabaseWrapper,
    timeout_ms: int,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``func(*args, **kwargs)`` with ``statement_timeout`` set for the call's
    transaction only (``set_config(..., true)``, as ``SET LOCAL``).

    Behind a transaction pooler, a session setting could be sent to one server
    session and the query to another, and outlive the call on a session other
    clients then use. So: inside the caller's transaction the setting is put
    back as it was when the call ends; outside one, each statement the call
    sends in autocommit runs in a transaction of its own with the setting
    (so the call keeps autocommit's semantics: Django still refuses
    select_for_update, a failed statement ends only itself), and a
    transaction the call's code begins gets the setting with its first
    statement.
    """
    value = f"{timeout_ms}ms"
    if wrapper.in_atomic_block or not wrapper.get_autocommit():
        conn = wrapper.connection
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            # (The transaction has failed: so will the call's first query,
            # with Django's error - a setting sent now would fail first,
            # with psycopg's.)
            return func(*args, **kwargs)
        row = conn.execute("SELECT current_setting('statement_timeout')").fetchone()
        conn.execute(_SET_LOCAL_TIMEOUT, [value])
        try:
            return func(*args, **kwargs)
        finally:
            if (
                row is not None
                and not conn.closed
                and conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            ):
                conn.execute(_SET_LOCAL_TIMEOUT, [row[0]])

    def each_statement(
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: dict[str, Any],
    ) -> Any:
        conn = context["connection"].connection
        if conn.autocommit:
            with conn.transaction():
                conn.execute(_SET_LOCAL_TIMEOUT, [value])
                return execute(sql, params, many, context)
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            # (Without autocommit psycopg begins the transaction with this,
            # and the setting holds until that transaction ends.)
            conn.execute(_SET_LOCAL_TIMEOUT, [value])
        return execute(sql, params, many, context)

    wrapper.execute_wrappers.append(each_statement)
    try:
        return func(*args, **kwargs)
    finally:
        remove_execute_wrapper(wrapper, each_statement)


def with_statement_timeout(
    func: Callable[..., Any], alias: str, timeout_ms: int, local: bool
) -> Callable[..., Any]:
    """*func* under a set's statement timeout on *alias*'s connection of
    whatever thread runs it, as a lane runs its calls (*local*: behind a
    transaction pooler, :func:`run_with_local_timeout`); for a call the set
    runs as stock on its caller's blocked thread (see
    ``ConnectionSet._behind_own_caller``). Only statements on that thread's
    own connection: nothing here waits for a lane or the event loop."""

    def call(*args: Any, **kwargs: Any) -> Any:
        wrapper = connections[alias]
        if local:
            return run_with_local_timeout(wrapper, timeout_ms, func, args, kwargs)
        applied = getattr(wrapper, _TIMEOUT_ATTR, None)
        if (
            applied is not None
            and applied[0] is wrapper.connection
            and applied[1] is not None  # (None: a reset still owed, see below)
        ):
            # A call of the set this thread runs already set the timeout: it
            # holds, and that call resets it (a reset here would lift it for
            # the rest of that call).
            return func(*args, **kwargs)
        set_statement_timeout(wrapper, timeout_ms)
        try:
            return func(*args, **kwargs)
        finally:
            # Never left on the connection: the thread's next code is not the set's.
            reset_statement_timeout(wrapper)

    return call


def set_statement_timeout(wrapper: BaseDatabaseWrapper, timeout_ms: int) -> None:
    """Bound each query of *wrapper*'s connection to ``timeout_ms`` of server time."""
    wrapper.ensure_connection()
    conn = wrapper.connection
    if getattr(wrapper, _TIMEOUT_ATTR, None) == (conn, timeout_ms):
        return
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
        # A failed transaction refuses the SET with psycopg's own error; the
        # call's query fails there anyway, with Django's error as on stock.
        return
    conn.execute(
        "SELECT set_config('statement_timeout', %s, false)", [f"{timeout_ms}ms"]
    )
    setattr(wrapper, _TIMEOUT_ATTR, (conn, timeout_ms))


def reset_statement_timeout(wrapper: BaseDatabaseWrapper) -> None:
    """Undo :func:`set_statement_timeout`, if it was applied to this connection."""
    applied = getattr(wrapper, _TIMEOUT_ATTR, None)
    if applied is None:
        return
    delattr(wrapper, _TIMEOUT_ATTR)
    conn = wrapper.connection
    if conn is None or conn is not applied[0] or conn.closed or conn.broken:
        return
    try:
        conn.execute("RESET statement_timeout")
    except psycopg.Error:
        # Only inside a failed transaction. Its rollback undoes a SET sent in
        # it, not one sent before it began (a block's first call sets the
        # timeout in autocommit, then enters the transaction): stay marked, so
        # that the next reset, after the rollback, sends RESET again, and a
        # connection never goes back with the timeout. (None: never taken
        # for a timeout set, so the next call sets its own again.)
        setattr(wrapper, _TIMEOUT_ATTR, (conn, None))
        logger.debug("asgi_dbset: could not reset statement_timeout", exc_info=True)


def return_thread_connections() -> None:
    """Return the calling thread's Django connections to their pools.

    Runs on the thread that owns them. A connection left inside a transaction
    is rolled back first; one that is broken is discarded by the pool. Every
    wrapper is left clean for the thread's next lane.
    """
    _return_all(connections.all(initialized_only=True), _return_connection)


def _return_all(
    wrappers: Sequence[BaseDatabaseWrapper],
    return_one: Callable[[BaseDatabaseWrapper], None],
) -> None:
    """Return each wrapper's connection; leave every wrapper clean, even if
    returning one of them fails."""
    for wrapper in wrappers:
        try:
            return_one(wrapper)
        except Exception:
            logger.warning(
                "asgi_dbset: error returning a connection of database %r",
                wrapper.alias,
                exc_info=True,
            )
        finally:
            _clear(wrapper)


def _between_calls(wrapper: BaseDatabaseWrapper) -> bool:
    """True when nothing of *wrapper*'s connection outlives the call that
    used it: no transaction, snapshot or statement timeout (returning it
    then takes no query and loses nothing the next call could need)."""
    conn = wrapper.connection
    return (
        conn is not None
        and not conn.closed
        and not conn.broken
        and wrapper.autocommit
        and not wrapper.in_atomic_block
        and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        and getattr(wrapper, snapshots.MARK, None) is None
        and getattr(wrapper, _TIMEOUT_ATTR, None) is None
    )


def _put_back(wrapper: BaseDatabaseWrapper) -> None:
    # What Django's close() does for a pooled connection; its close() itself
    # refuses to run on an event loop's thread (async_unsafe).
    conn = wrapper.connection
    if conn is not None:
        conn._pool.putconn(conn)


def _clear(wrapper: BaseDatabaseWrapper) -> None:
    """Leave *wrapper* without a connection and clean for the thread's next lane."""
    wrapper.connection = None
    wrapper.in_atomic_block = False
    wrapper.savepoint_ids = []
    wrapper.atomic_blocks = []
    wrapper.needs_rollback = False
    wrapper.closed_in_transaction = False
    wrapper.run_on_commit = []
    # What stock Django's fresh thread of each request starts with: no hook a
    # connection_created receiver appended for the connection returned (it
    # appends one again for the next), no query logged under DEBUG.
    wrapper.execute_wrappers = []
    wrapper.queries_log.clear()


def leave_snapshot(wrapper: BaseDatabaseWrapper) -> None:
    """End *wrapper*'s snapshot transaction (on its thread). A statement
    timeout set inside it went with the rollback, one set before it did not:
    reset it either way, and the next call sets it again."""
    if getattr(wrapper, snapshots.MARK, None) is not None:
        snapshots.leave(wrapper)
        reset_statement_timeout(wrapper)


def leave_thread_snapshots() -> None:
    """On a lane's thread: end the snapshot transactions of its connections."""
    for wrapper in connections.all(initialized_only=True):
        leave_snapshot(wrapper)


def _return_connection(wrapper: BaseDatabaseWrapper) -> None:
    conn = wrapper.connection
    if conn is None:
        return
    try:
        leave_snapshot(wrapper)  # the set's own transaction: not a rollback
    except psycopg.Error:
        logger.debug("asgi_dbset: could not end a snapshot", exc_info=True)
    if conn.broken or conn.closed:
        stats.incr("connections_discarded")
        logger.warning(
            "asgi_dbset: discarding a broken connection of database %r", wrapper.alias
        )
    elif conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        # (An asgi_dbset.atomic() block whose task outlived its request, say.)
        # Rolled back here, before the statement timeout is reset (a reset
        # inside the transaction would be undone with it): a connection never
        # goes back to its pool inside a transaction.
        stats.incr("rollbacks")
        logger.warning(
            "asgi_dbset: a connection of database %r was returned inside a "
            "transaction; it is rolled back",
            wrapper.alias,
        )
        try:
            conn.rollback()
        except psycopg.Error:
            logger.debug("asgi_dbset: could not roll back", exc_info=True)
    reset_statement_timeout(wrapper)
    wrapper.close()
