"""System checks for ``ASGI_DBSET`` and the databases it runs on.

Registered in ``AppConfig.ready``; also run by ``DBSetMiddleware`` at startup,
so a bad configuration stops the server before it serves a request.
"""

from __future__ import annotations

import difflib
import inspect
import threading
import types
from collections.abc import Iterator, Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.core.exceptions import ImproperlyConfigured
from django.db.utils import load_backend
from django.utils.module_loading import import_string

from .budget import POOL_MIN_SIZE, keeps_request_state, pool_max_size, pool_options
from .conf import DEFAULTS
from .history import MAX_HISTORY
from .routing import install
from .validation import validate_lease_timeout, validate_statement_timeout

_POSTGRES = "django.db.backends.postgresql"


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    raw = getattr(settings, "ASGI_DBSET", {})
    if not isinstance(raw, dict):
        return [
            Error(
                f"ASGI_DBSET must be a dict, not {type(raw).__name__}.",
                hint='Write ASGI_DBSET = {"DEFAULT_PARALLELISM": 1, "MAX_PARALLELISM": 8}.',
                id="asgi_dbset.E001",
            )
        ]
    errors: list[CheckMessage] = []
    for key in raw:
        if key not in DEFAULTS:
            close = difflib.get_close_matches(str(key), DEFAULTS, n=1)
            hint = (
                f"Did you mean {close[0]!r}?"
                if close
                else f"Known keys: {', '.join(DEFAULTS)}."
            )
            errors.append(
                Error(
                    f"ASGI_DBSET has an unknown key {key!r}.",
                    hint=hint,
                    id="asgi_dbset.E002",
                )
            )
    values = {**DEFAULTS, **raw}

    default, maximum = values["DEFAULT_PARALLELISM"], values["MAX_PARALLELISM"]
    for key, value, check_id in (
        ("DEFAULT_PARALLELISM", default, "asgi_dbset.E003"),
        ("MAX_PARALLELISM", maximum, "asgi_dbset.E004"),
    ):
        if not _is_positive_int(value):
            errors.append(
                Error(
                    f"ASGI_DBSET[{key!r}] must be a whole number of at least 1, not {value!r}.",
                    hint=f'For example "{key}": {DEFAULTS[key]}. 1 runs a request\'s '
                    "queries one at a time, as stock Django does.",
                    id=check_id,
                )
            )
    if _is_positive_int(default) and _is_positive_int(maximum) and default > maximum:
        errors.append(
            Error(
                f"ASGI_DBSET['DEFAULT_PARALLELISM'] ({default}) is larger than "
                f"MAX_PARALLELISM ({maximum}).",
                hint=f"Lower DEFAULT_PARALLELISM to at most {maximum}, or raise MAX_PARALLELISM.",
                id="asgi_dbset.E005",
            )
        )

    budget = values["BUDGET"]
    if budget is not None and not _is_positive_int(budget):
        errors.append(
            Error(
                f"ASGI_DBSET['BUDGET'] must be None or a whole number of at least 1, not {budget!r}.",
                hint="It counts the extra connections all requests of a process may hold "
                "together; None gives each database half of its pool.",
                id="asgi_dbset.E006",
            )
        )

    # The same validators as the ones ConnectionSet applies to its arguments.
    try:
        validate_lease_timeout(
            values["LEASE_TIMEOUT"], what="ASGI_DBSET['LEASE_TIMEOUT']"
        )
    except (TypeError, ValueError) as exc:
        errors.append(
            Error(
                str(exc), hint='For example "LEASE_TIMEOUT": 0.1.', id="asgi_dbset.E007"
            )
        )
    try:
        validate_statement_timeout(
            values["STATEMENT_TIMEOUT"], what="ASGI_DBSET['STATEMENT_TIMEOUT']"
        )
    except (TypeError, ValueError) as exc:
        errors.append(
            Error(
                str(exc),
                hint='For example "STATEMENT_TIMEOUT": 5 (seconds of server time per query).',
                id="asgi_dbset.E011",
            )
        )
    if not isinstance(values["SERVER_TIMING"], bool):
        errors.append(
            Error(
                f"ASGI_DBSET['SERVER_TIMING'] must be True or False, not "
                f"{values['SERVER_TIMING']!r}.",
                hint='Write "SERVER_TIMING": True to add the header, False to leave it out.',
                id="asgi_dbset.E012",
            )
        )
    history = values["HISTORY"]
    if (
        isinstance(history, bool)
        or not isinstance(history, int)
        or not 0 <= history <= MAX_HISTORY
    ):
        errors.append(
            Error(
                f"ASGI_DBSET['HISTORY'] must be a whole number from 0 to {MAX_HISTORY}, "
                f"not {history!r}.",
                hint='For example "HISTORY": 50 keeps the last 50 requests; 0 keeps none.',
                id="asgi_dbset.E013",
            )
        )

    errors.extend(_check_transaction_pooled(values["TRANSACTION_POOLED"]))

    parallel = _is_positive_int(maximum) and maximum > 1
    for alias, db in settings.DATABASES.items():
        engine = db.get("ENGINE", "")
        postgresql = _is_postgresql(engine)
        if postgresql is None:
            continue  # Django reports a backend it cannot load when it first uses it
        if not postgresql:
            if parallel:
                errors.append(
                    Warning(
                        f"Database {alias!r} uses {engine or 'no engine'}; asgi_dbset runs "
                        "only PostgreSQL (psycopg 3) calls in parallel.",
                        hint="Calls on this database run one at a time, as stock Django does.",
                        id="asgi_dbset.W002",
                    )
                )
            continue
        if parallel and keeps_request_state(alias):
            errors.append(
                Warning(
                    f"Database {alias!r} uses {engine}, which keeps per-request "
                    "state (the tenant's schema: set_tenant(), set_schema()) on "
                    "the request's connection; an extra lane's connection would "
                    "not have it. Its calls run one at a time on the request's "
                    "connection, as stock Django runs them.",
                    hint="Nothing to change: its results are stock Django's. To "
                    'silence this: SILENCED_SYSTEM_CHECKS = ["asgi_dbset.W005"].',
                    id="asgi_dbset.W005",
                )
            )
        pool = db.get("OPTIONS", {}).get("pool")
        pool_error = _check_pool(alias, pool) if pool else None
        if pool_error is not None:
            errors.append(pool_error)
            continue
        if pool_options(alias) is None:
            if parallel:
                errors.append(
                    Error(
                        f"Database {alias!r} has no connection pool, so its queries "
                        "cannot run in parallel.",
                        hint=f'Add DATABASES[{alias!r}]["OPTIONS"]["pool"] = '
                        '{"min_size": 4, "max_size": 20} (psycopg[pool] is required), '
                        'or set ASGI_DBSET["MAX_PARALLELISM"] = 1.',
                        id="asgi_dbset.E008",
                    )
                )
            continue
        if db.get("CONN_MAX_AGE", 0) != 0:
            errors.append(
                Error(
                    f"Database {alias!r} is pooled but has CONN_MAX_AGE = {db.get('CONN_MAX_AGE')!r}.",
                    hint=f'Set DATABASES[{alias!r}]["CONN_MAX_AGE"] = 0: the pool keeps '
                    "connections open; Django refuses both together.",
                    id="asgi_dbset.E009",
                )
            )
        if parallel and db.get("AUTOCOMMIT", True) is False:
            # Without autocommit every connection of the alias is in a
            # transaction of its own from its first query until the program
            # commits on the request's thread: a write on an extra lane sits
            # in the lane's transaction, unseen by the request's queries, and
            # is rolled back when the lane's connection goes back to the pool.
            errors.append(
                Error(
                    f"Database {alias!r} has AUTOCOMMIT = False: its calls on "
                    "extra lanes would run in transactions of their own, which "
                    "the request's transaction.commit() never commits (their "
                    "writes are rolled back when the lane returns its "
                    "connection, and the request's queries do not see them).",
                    hint=f'Keep DATABASES[{alias!r}]["AUTOCOMMIT"] = True (the '
                    "default) and group writes with transaction.atomic() / "
                    'asgi_dbset.atomic(), or set ASGI_DBSET["MAX_PARALLELISM"] = 1.',
                    id="asgi_dbset.E018",
                )
            )
        max_size = pool_max_size(alias)
        if _is_positive_int(budget) and max_size is not None and budget >= max_size:
            errors.append(
                Error(
                    f"ASGI_DBSET['BUDGET'] ({budget}) does not fit the pool of database "
                    f"{alias!r} (max_size {max_size}): extra lanes must leave at least one "
                    "connection for requests' own connections.",
                    # (BUDGET is at least 1: a pool of 1 can only grow.)
                    hint=(
                        f"Set BUDGET to at most {max_size - 1}, or raise "
                        if max_size > 1
                        else "Raise "
                    )
                    + f'DATABASES[{alias!r}]["OPTIONS"]["pool"]["max_size"] above {budget}.',
                    id="asgi_dbset.E010",
                )
            )
        elif parallel and budget is None and max_size is not None and max_size < 2:
            # Without BUDGET an alias lends max_size // 2 extra lanes: none here.
            errors.append(
                Warning(
                    f"The pool of database {alias!r} has max_size {max_size}, so it "
                    "lends no extra lane: its calls run one at a time.",
                    hint=f'Raise DATABASES[{alias!r}]["OPTIONS"]["pool"]["max_size"] '
                    "(extra lanes take at most half of it), or set "
                    'ASGI_DBSET["MAX_PARALLELISM"] = 1.',
                    id="asgi_dbset.W004",
                )
            )
        waiting = pool.get("max_waiting", 0) if isinstance(pool, dict) else 0
        if (
            parallel
            and waiting
            and max_size is not None
            and max_size >= 2
            # (A database that keeps per-request state lends no lane: W005.)
            and not keeps_request_state(alias)
        ):
            # The pool refuses a getconn() at once when max_waiting others
            # wait; the connections extra lanes hold are ones requests'
            # own would have had on stock Django, so requests queue sooner
            # and a request stock Django serves may be refused. The library
            # cannot keep stock's outcome there: it says so at startup.
            errors.append(
                Warning(
                    f"The pool of database {alias!r} has max_waiting {waiting}: it "
                    "refuses a request's connection at once (psycopg_pool."
                    "TooManyRequests, an OperationalError) while that many "
                    "requests wait. Extra lanes hold connections requests would "
                    "have had on stock Django, so under load requests wait sooner, "
                    "and some that stock Django serves are refused.",
                    hint=f'Leave DATABASES[{alias!r}]["OPTIONS"]["pool"]["max_waiting"] '
                    "at 0 (requests then wait up to the pool's timeout, a wait the "
                    "lanes shorten as they go back), or set "
                    'ASGI_DBSET["MAX_PARALLELISM"] = 1. To accept it: '
                    'SILENCED_SYSTEM_CHECKS = ["asgi_dbset.W006"].',
                    id="asgi_dbset.W006",
                )
            )
    return errors


def _is_postgresql(engine: str) -> bool | None:
    """Whether *engine* is Django's PostgreSQL backend or one built on it
    (PostGIS, django-prometheus', django-tenants'...): the lanes lease from
    the pool those backends share. None when the backend cannot be loaded."""
    if engine == _POSTGRES:
        return True
    from django.db.backends.postgresql.base import DatabaseWrapper

    try:
        backend = load_backend(engine)
    except ImproperlyConfigured:
        return None
    wrapper = getattr(backend, "DatabaseWrapper", None)
    return isinstance(wrapper, type) and issubclass(wrapper, DatabaseWrapper)


def _check_pool(alias: str, pool: object) -> CheckMessage | None:
    """E017: pool options psycopg_pool would refuse when Django makes the
    pool, at the first query - checked here, so they fail at startup."""
    where = f'DATABASES[{alias!r}]["OPTIONS"]["pool"]'
    example = '{"min_size": 4, "max_size": 20}'
    sizes_hint = (
        f"For example {where} = {example} (max_size at least min_size, "
        "which defaults to 4), or True for psycopg_pool's defaults."
    )
    if pool is True:
        return None
    if not isinstance(pool, dict):
        problem = f"must be True or a dict of psycopg_pool.ConnectionPool arguments, not {pool!r}"
        return _pool_error(where, problem, sizes_hint)
    # Django passes these arguments to ConnectionPool itself: given again
    # here, the pool's creation fails ("got multiple values for keyword
    # argument") at the first query.
    for key, hint in _django_pool_arguments(alias).items():
        if key in pool:
            problem = f"has {key!r}, which Django passes to the pool itself"
            return _pool_error(where, problem, f"Remove {key!r}: {hint}")
    known = _pool_parameters()
    for key in pool:
        if known is not None and key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            problem = f"has {key!r}, which is no psycopg_pool.ConnectionPool argument"
            hint = (
                f"Did you mean {close[0]!r}?"
                if close
                else f"Its arguments are: {', '.join(sorted(known))}."
            )
            return _pool_error(where, problem, hint)
    min_size = pool.get("min_size", POOL_MIN_SIZE)
    max_size = pool.get("max_size")
    sizes = (min_size,) if max_size is None else (min_size, max_size)
    if not all(_is_whole(size) for size in sizes):
        problem = (
            "needs whole numbers for min_size and max_size, not "
            f"min_size={min_size!r}, max_size={max_size!r}"
        )
    elif min_size < 0:
        problem = f"has min_size {min_size}; it cannot be negative"
    elif max_size is not None and max_size < min_size:
        problem = f"has max_size {max_size} below its min_size {min_size}"
    elif (min_size if max_size is None else max_size) == 0:
        problem = "has max_size 0: it would have no connection"
    else:
        return _check_pool_numbers(where, pool)
    return _pool_error(where, problem, sizes_hint)


def _check_pool_numbers(where: str, pool: dict[Any, Any]) -> CheckMessage | None:
    """E017 for the pool's other numbers: psycopg_pool refuses num_workers
    below 1 when the pool is made; a timeout that is no number fails every
    getconn(), and a lifetime that is no number every connection the pool's
    workers open (each getconn() then waits the pool's whole timeout)."""
    workers = pool.get("num_workers", 3)
    if not _is_whole(workers) or workers < 1:
        problem = (
            f"has num_workers {workers!r}; it must be a whole number of at least 1"
        )
        return _pool_error(
            where, problem, 'For example "num_workers": 3 (the default).'
        )
    for key in _POOL_SECONDS:
        value = pool.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float):
            problem = f"has {key} {value!r}; it must be a number of seconds"
            return _pool_error(
                where, problem, f'For example "{key}": {_POOL_SECONDS[key]}.'
            )
    waiting = pool.get("max_waiting", 0)
    if not _is_whole(waiting):
        problem = f"has max_waiting {waiting!r}; it must be a whole number"
        return _pool_error(
            where, problem, "0 (the default) lets any number of requests wait."
        )
    return None


# psycopg_pool.ConnectionPool's arguments in seconds, with their defaults.
_POOL_SECONDS = {
    "timeout": 30.0,
    "max_lifetime": 3600.0,
    "max_idle": 600.0,
    "reconnect_timeout": 300.0,
}


def _django_pool_arguments(alias: str) -> dict[str, str]:
    """The ConnectionPool arguments Django's backend passes itself, each with
    what to write instead."""
    import django

    arguments = {
        "kwargs": f"the connection's parameters go in DATABASES[{alias!r}] "
        '(NAME, USER, HOST, ...) and its "OPTIONS".',
        "open": "Django opens the pool itself, at the first query (DBSetMiddleware "
        "at startup, when the server sends lifespan events).",
        "configure": "Django configures every new connection itself (its time zone, "
        f'OPTIONS["assume_role"]); for a session setting write DATABASES[{alias!r}]'
        '["OPTIONS"]["options"] = "-c name=value".',
    }
    if django.VERSION < (6, 1):
        # (Django 6.1 takes a check of the pool options over its own:
        # ticket 37075.)
        arguments["check"] = (
            f'DATABASES[{alias!r}]["CONN_HEALTH_CHECKS"] = True makes Django pass '
            "check=ConnectionPool.check_connection (Django 6.1 also takes a check "
            "of your own here)."
        )
    return arguments


def _pool_parameters() -> frozenset[str] | None:
    """The keyword arguments of psycopg_pool.ConnectionPool (None when
    psycopg_pool is missing: Django says so at the first query)."""
    try:
        from psycopg_pool import ConnectionPool
    except ImportError:
        return None
    parameters = inspect.signature(ConnectionPool.__init__).parameters
    return frozenset(name for name in parameters if name != "self")


def _pool_error(where: str, problem: str, hint: str) -> CheckMessage:
    return Error(
        f"{where} {problem}; psycopg_pool refuses it at the first query.",
        hint=hint,
        id="asgi_dbset.E017",
    )


def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_transaction_pooled(pooled: Any) -> list[CheckMessage]:
    """E014-E016: aliases declared behind a transaction-pooling PgBouncer."""
    if isinstance(pooled, str) or not isinstance(
        pooled, list | tuple | set | frozenset
    ):
        return [
            Error(
                f"ASGI_DBSET['TRANSACTION_POOLED'] must list database aliases, not "
                f"{pooled!r}.",
                hint='For example "TRANSACTION_POOLED": ["default"] for a database '
                "reached through PgBouncer in transaction pooling mode.",
                id="asgi_dbset.E014",
            )
        ]
    errors: list[CheckMessage] = []
    for alias in pooled:
        db = settings.DATABASES.get(alias) if isinstance(alias, str) else None
        if db is None:
            errors.append(
                Error(
                    f"ASGI_DBSET['TRANSACTION_POOLED'] names {alias!r}, which is not "
                    "in DATABASES.",
                    hint=f"Known aliases: {', '.join(settings.DATABASES)}.",
                    id="asgi_dbset.E014",
                )
            )
            continue
        engine = db.get("ENGINE", "")
        if _is_postgresql(engine) is False:
            # (PgBouncer pools PostgreSQL sessions only: the E015/E016 hints
            # below would send the user after the wrong settings.)
            errors.append(
                Error(
                    f"ASGI_DBSET['TRANSACTION_POOLED'] names {alias!r}, which uses "
                    f"{engine or 'no engine'}, not PostgreSQL: only PostgreSQL "
                    "databases are reached through a transaction pooler.",
                    hint=f"Remove {alias!r} from TRANSACTION_POOLED.",
                    id="asgi_dbset.E014",
                )
            )
            continue
        if not db.get("DISABLE_SERVER_SIDE_CURSORS", False):
            errors.append(
                Error(
                    f"Database {alias!r} is behind a transaction pooler but uses "
                    "server-side cursors: an iterator()'s or aiterator()'s cursor "
                    'would be gone by its next chunk ("cursor does not exist").',
                    hint=f'Set DATABASES[{alias!r}]["DISABLE_SERVER_SIDE_CURSORS"] = '
                    "True (iterators then fetch their rows at once).",
                    id="asgi_dbset.E015",
                )
            )
        options = db.get("OPTIONS", {})
        if (
            options.get("server_side_binding")
            and options.get("prepare_threshold", 5) is not None
        ):
            errors.append(
                Error(
                    f"Database {alias!r} is behind a transaction pooler and binds "
                    "parameters on the server, so psycopg prepares statements: the "
                    "next transaction may reach another server session, where they "
                    "do not exist (or already do).",
                    hint=f'Set DATABASES[{alias!r}]["OPTIONS"]["prepare_threshold"] = '
                    "None, or leave server_side_binding off.",
                    id="asgi_dbset.E016",
                )
            )
    return errors


def check_routing(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    return [
        Warning(
            f"asgi_dbset could not route the async ORM calls of {name}: its "
            "sync_to_async is not asgiref's. Those calls run as stock Django.",
            hint="Report this with your Django version; another library may patch the same name.",
            id="asgi_dbset.W001",
        )
        for name in install()
    ]


def check_routers(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """W003: a database router that keeps state per thread.

    Stock Django asks the routers on the request's thread, the one that runs
    every query of the request. A lane runs its call on a thread of its own,
    so what a router stored in a ``threading.local`` on the request's thread
    (django-multidb-router's pinning router: "this request wrote, read from
    the primary") is not there. The library cannot keep such a router's
    semantics, so it names it rather than guess. Found by reading the names
    the router's methods use, and the functions they call, a few levels deep.
    """
    raw = getattr(settings, "ASGI_DBSET", {})
    maximum = (raw if isinstance(raw, dict) else {}).get(
        "MAX_PARALLELISM", DEFAULTS["MAX_PARALLELISM"]
    )
    if _is_positive_int(maximum) and maximum == 1:
        return []  # every query runs on the request's thread, as in stock Django
    messages: list[CheckMessage] = []
    for entry in settings.DATABASE_ROUTERS:
        try:
            router = import_string(entry) if isinstance(entry, str) else entry
        except ImportError:
            continue  # Django reports it when it first routes a query
        name = entry if isinstance(entry, str) else _qualname(router)
        found = _thread_state(router)
        if found is None:
            continue
        messages.append(
            Warning(
                f"Database router {name} keeps state per thread ({found} is a "
                "threading.local); asgi_dbset runs ORM calls on other threads than "
                "the request's, where that state is not seen, so the router may "
                "route them differently than stock Django would (for example, "
                "reads after a write no longer go to the primary).",
                hint="Keep the router's per-request state in one mutable object "
                "held in a contextvars.ContextVar that is set when the request "
                "starts (every lane of the request sees that object); or route "
                "such queries explicitly with .using(); or set "
                'ASGI_DBSET["MAX_PARALLELISM"] = 1. See "Database routers" in '
                "docs/deployment.md.",
                obj=name,
                id="asgi_dbset.W003",
            )
        )
    return messages


def _qualname(obj: object) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_thread_state(value: object) -> bool:
    # asgiref's Local(thread_critical=True) is per thread like threading.local.
    return isinstance(value, threading.local) or (
        type(value).__name__ == "_ThreadCriticalLocal"
    )


def _thread_state(router: object, depth: int = 3) -> str | None:
    """The dotted name of a thread-local that *router*'s methods reach, or None."""
    cls = router if isinstance(router, type) else type(router)
    if not isinstance(router, type):
        for attr, value in vars(router).items() if hasattr(router, "__dict__") else ():
            if _is_thread_state(value):
                return f"{_qualname(router)}.{attr}"
    for klass in cls.__mro__[:-1]:
        for attr, value in vars(klass).items():
            if _is_thread_state(value):
                return f"{_qualname(klass)}.{attr}"
    seen: set[int] = set()
    for function in _methods(cls):
        found = _reached_from(function, depth, seen)
        if found is not None:
            return found
    return None


def _methods(cls: type) -> Iterator[types.FunctionType]:
    for klass in cls.__mro__[:-1]:
        for value in vars(klass).values():
            if isinstance(value, staticmethod | classmethod):
                value = value.__func__
            elif isinstance(value, property):
                value = value.fget
            if isinstance(value, types.FunctionType):
                yield value


def _names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # nested functions, lambdas
            yield from _names(const)


def _reached_from(
    function: types.FunctionType, depth: int, seen: set[int]
) -> str | None:
    if id(function) in seen or depth <= 0:
        return None
    seen.add(id(function))
    names = list(_names(function.__code__))
    scope = function.__globals__
    for name in names:
        value = scope.get(name)
        if value is None:
            continue
        if _is_thread_state(value):
            return f"{function.__module__}.{name}"
        if isinstance(value, types.ModuleType):
            # module.attr: the attribute names are among the code's names too.
            for attr in names:
                member = getattr(value, attr, None)
                if _is_thread_state(member):
                    return f"{value.__name__}.{attr}"
                if isinstance(member, types.FunctionType):
                    found = _reached_from(member, depth - 1, seen)
                    if found is not None:
                        return found
        elif isinstance(value, types.FunctionType):
            found = _reached_from(value, depth - 1, seen)
            if found is not None:
                return found
        elif isinstance(value, type):
            for method in _methods(value):
                found = _reached_from(method, depth - 1, seen)
                if found is not None:
                    return found
    return None
