"""What an async ORM call will touch: its database alias, and its cursor if any.

Django's async entry points all end in ``sync_to_async(f)(*args, **kwargs)``
where ``f`` is a bound method of a QuerySet, RawQuerySet, model instance or
related manager, ``prefetch_related_objects``, or ``aiterator()``'s local
``next_slice(generator)``. This module reads the alias from those objects the
way Django itself will (routers included) without running any query
(:func:`target_of`), and pins the call to that answer (:func:`pinned`), so
that Django does not ask the routers a second time on the lane's thread.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import django
from django.core.exceptions import FieldDoesNotExist
from django.db import DEFAULT_DB_ALIAS, connections, router
from django.db.models import Manager, Model, Prefetch, QuerySet
from django.db.models.constants import LOOKUP_SEP
from django.db.models.fields.related_descriptors import (
    ForwardManyToOneDescriptor,
    ManyToManyDescriptor,
    ReverseManyToOneDescriptor,
    ReverseOneToOneDescriptor,
)
from django.db.models.query import (
    FlatValuesListIterable,
    ModelIterable,
    RawQuerySet,
    ValuesIterable,
    ValuesListIterable,
    prefetch_related_objects,
)

from .context import blocks_around, current_block
from .hop import sync_thread_above
from .transactions import EVERY_ALIAS

# QuerySet / manager methods that Django runs against the write database.
_WRITES = frozenset(
    {
        "create",
        "get_or_create",
        "update_or_create",
        "bulk_create",
        "bulk_update",
        "update",
        "delete",
        "add",
        "remove",
        "clear",
        "set",
    }
)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a call goes: ``alias``; ``cursor`` is the generator of an open
    ``aiterator()`` whose chunks must all run on the connection that opened it.
    ``scope``, when set: what lane 0 must be outside a transaction of before
    the call may run elsewhere, in place of ``alias`` - ``EVERY_ALIAS`` for a
    call that may touch any database (``sync_to_lane``). ``also``: a second
    database the call writes, when Django routes part of it elsewhere (a
    many-to-many ``acreate`` whose link table lives apart from its model).
    ``lane0``: the databases the call queries cannot be told before it runs
    (see :func:`_anywhere`): outside a transaction block it runs on lane 0,
    with the request's own connections, as stock Django runs it.
    ``routed``: for a lane-0 prefetch, asks the routers (once) which one
    database its querysets read - used only inside blocks of several
    databases on different lanes, where the call could not run otherwise."""

    alias: str
    cursor: types.GeneratorType[Any, None, None] | None = None
    scope: str | None = None
    also: str | None = None
    lane0: bool = False
    routed: Callable[[], str | None] | None = field(default=None, compare=False)


def routed_target(
    dbset: object,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Target | None:
    """:func:`target_of`, for a call of *dbset*, routers configured: with the
    routers seeing the transactions stock Django's would (:func:`seen_from_blocks`)."""
    if current_block.get() is None and not getattr(dbset, "outer_connections", None):
        return target_of(func, args, kwargs)  # (most calls: nothing to show)
    with seen_from_blocks(dbset):
        return target_of(func, args, kwargs)


@contextlib.contextmanager
def seen_from_blocks(dbset: object) -> Iterator[None]:
    """While the routers are asked, on the event loop's thread, for a call
    made inside ``asgi_dbset.atomic()`` blocks of *dbset*: Django's connection
    of each block's alias there is the block's own, inside its transaction;
    under ``async_to_sync``, the other aliases' are the sync caller's (lane
    0's thread, inside the transaction a ``TestCase`` holds there).

    Stock Django asks the routers on the thread inside the transaction, and
    a router may look at it: one that sends reads inside a transaction to the
    primary (``transaction.get_connection().in_atomic_block``) must see the
    block, or it sends them to the replica, outside the block. Only the
    connection's state is read there; a router that queries with it fails as
    it does on any async thread (``SynchronousOnlyOperation``)."""
    block = current_block.get()
    outer = getattr(dbset, "outer_connections", None)
    if (block is None and not outer) or not router.routers:
        yield
        return
    mine: dict[str, Any] = {}
    for around in blocks_around(block):  # (innermost first)
        if around.dbset is dbset:
            mine.setdefault(around.alias, around.entered.connection)
    caller = outer.get(sync_thread_above()) if outer else None
    if caller is not None:
        # Under async_to_sync, outside blocks: the sync caller's thread (lane
        # 0), inside the transaction it may hold (a TestCase's).
        for alias, wrapper in caller.items():
            mine.setdefault(alias, wrapper)
    local = connections._connections  # type: ignore[attr-defined]
    saved = {alias: getattr(local, alias, None) for alias in mine}
    # (Nothing else runs on the loop's thread until they are put back.)
    for alias, wrapper in mine.items():
        setattr(local, alias, wrapper)
    try:
        yield
    finally:
        for alias, wrapper in saved.items():
            if wrapper is None:
                delattr(local, alias)
            else:
                setattr(local, alias, wrapper)


def _anywhere(alias: str) -> Target:
    """A call that may query other databases than *alias*, which cannot be
    told before it runs: on a lane of *alias* its queries there would go to
    connections of the lane's thread outside the set's budget, outside the
    transaction blocks and the snapshot of those databases. It runs on lane 0
    (the request's own connections, as on stock Django), or inside blocks on
    their lane, as a call that may touch any database."""
    return Target(alias, scope=EVERY_ALIAS, lane0=True)


def _queryset_alias(qs: QuerySet[Any] | Manager[Any], write: bool) -> str:
    if qs._db:  # type: ignore[union-attr]
        return str(qs._db)  # type: ignore[union-attr]
    hints = dict(getattr(qs, "_hints", {}))
    # Related managers route by the instance they belong to, as Django does.
    instance = getattr(qs, "instance", None)
    if isinstance(instance, Model):
        hints.setdefault("instance", instance)
    # select_for_update() and friends read from the write database.
    if write or getattr(qs, "_for_write", False):
        return str(router.db_for_write(qs.model, **hints))
    return str(router.db_for_read(qs.model, **hints))


# Methods a many-to-many related manager runs on its link table's database.
_LINK_WRITES = frozenset({"add", "remove", "clear", "set"})


def _related_manager_target(
    manager: Manager[Any],
    instance: Model,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Target:
    """Where Django's related manager method *name* writes: each of them asks
    the routers itself, with only the manager's instance as hint - never the
    manager's own ``_db`` or hints (``db_manager()``)."""
    through = getattr(manager, "through", None)
    if through is None:
        # Reverse foreign key and generic relation managers: the related model.
        alias = str(router.db_for_write(manager.model, instance=instance))
        if kwargs.get("bulk") is False and name in ("add", "set"):
            return _saved_one_by_one(manager, alias, name, args, kwargs)
        return Target(alias)
    # Many-to-many: the links are written where the routers send the through
    # model, which need not be where they send either end of the relation.
    links = str(router.db_for_write(through, instance=instance))
    if name in _LINK_WRITES:
        return Target(links)
    # create(), get_or_create(), update_or_create(): the object is written
    # where the routers send the *instance's* model, then linked (add()).
    alias = str(router.db_for_write(type(instance), instance=instance))
    return Target(alias, also=None if links == alias else links)


def _saved_one_by_one(
    manager: Manager[Any],
    alias: str,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Target:
    """``add(*objs, bulk=False)`` / ``set(objs, bulk=False)`` of a reverse
    foreign key or generic relation manager: Django saves each object with
    ``obj.save()``, which writes where the routers send *that object*
    (``db_for_write(type(obj), instance=obj)``: by default the database it was
    read from), inside ``transaction.atomic(using=alias, savepoint=False)``; a
    nullable relation's ``set()`` also reads and unlinks the old objects on
    *alias*."""
    objs = args if name == "add" else args[0] if args else kwargs.get("objs")
    if not isinstance(objs, list | tuple | set | frozenset):
        return _anywhere(alias)  # (an iterator: read here, it would be used up)
    saved = {
        str(router.db_for_write(type(obj), instance=obj))
        for obj in objs
        if isinstance(obj, Model)
    }
    # (A generic relation's set() always does: it has no field to say.)
    if name == "set" and getattr(getattr(manager, "field", None), "null", True):
        saved.add(alias)
    if not saved or saved == {alias}:
        return Target(alias)
    if len(saved) == 1:
        # Written on the objects' database, inside an atomic block of the
        # manager's: the call is inside a transaction block of either.
        return Target(saved.pop(), also=alias)
    if len(saved) == 2 and alias in saved:
        return Target(alias, also=(saved - {alias}).pop())
    return _anywhere(alias)


# QuerySet methods that fetch rows, and so run its prefetch_related() lookups.
_FETCHES = frozenset(
    {
        "_fetch_all",
        "get",
        "first",
        "last",
        "earliest",
        "latest",
        "in_bulk",
        "get_or_create",
        "update_or_create",
    }
)


def _related_model(model: type[Model], attr: str) -> type[Model] | None:
    """The model whose rows Django's prefetch of *attr* on *model* queries,
    for the related descriptors whose queryset it builds from the routers
    (None for any other attribute: a generic foreign key, a property)."""
    descriptor = model.__dict__.get(attr) or getattr(model, attr, None)
    related: Any = None
    if isinstance(descriptor, ForwardManyToOneDescriptor):
        related = descriptor.field.remote_field.model
    elif isinstance(descriptor, ReverseOneToOneDescriptor):
        related = descriptor.related.related_model
    elif isinstance(descriptor, ManyToManyDescriptor):
        rel = descriptor.rel
        related = rel.related_model if descriptor.reverse else rel.model
    elif isinstance(descriptor, ReverseManyToOneDescriptor):
        # (A generic relation's manager queries its rel's model; a reverse
        # foreign key's, the model holding the key.)
        generic = type(descriptor).__name__ == "ReverseGenericManyToOneDescriptor"
        related = descriptor.rel.model if generic else descriptor.rel.related_model
    return related if isinstance(related, type) and issubclass(related, Model) else None


def _prefetch_aliases(
    model: type[Model], alias: str, lookups: tuple[Any, ...]
) -> set[str] | None:
    """The databases Django's ``prefetch_related_objects`` queries for
    *lookups* on instances of *model* read from *alias*; None when that cannot
    be told before it runs."""
    found: set[str] = set()
    no_routers = not router.routers
    for lookup in lookups:
        queryset = None
        if isinstance(lookup, Prefetch):
            through, queryset = lookup.prefetch_through, lookup.queryset
            if queryset is not None and queryset._prefetch_related_lookups:
                return None  # (lookups of its own, on rows not read yet)
        elif isinstance(lookup, str):
            through = lookup
        else:
            return None
        current, db = model, alias
        parts = through.split(LOOKUP_SEP)
        for level, attr in enumerate(parts):
            related = _related_model(current, attr)
            if related is None:
                return None
            if level == len(parts) - 1 and queryset is not None and queryset._db:
                db = str(queryset._db)
            elif no_routers:
                # Django's related querysets ask the routers with the first
                # instance as hint: without routers, the database it came
                # from - the rows read at the level above.
                db = db
            else:
                # The routers decide on the thread that runs the call, asked
                # there again (twice per lookup), and their answer may change
                # from call to call (a replica router's random.choice): an
                # answer asked here would lease a lane whose thread then opens
                # a connection of another database, outside the set's budget.
                return None
            found.add(db)
            current = related
    return found


def _prefetch_target(
    model: type[Model], alias: str, lookups: tuple[Any, ...]
) -> Target:
    aliases = _prefetch_aliases(model, alias, lookups)
    if aliases is None or len(aliases) > 1:
        return _anywhere(alias)
    return Target(aliases.pop() if aliases else alias)


def _routed_alias(first: Model, lookups: tuple[Any, ...]) -> str | None:
    """The one database the routers name now for the querysets of
    ``prefetch_related_objects(instances, *lookups)`` (*first*: the first
    instance, Django's hint), or None: several, or a level below the first
    (whose hint is a row not read yet)."""
    found: set[str] = set()
    for lookup in lookups:
        queryset = None
        if isinstance(lookup, Prefetch):
            through, queryset = lookup.prefetch_through, lookup.queryset
        elif isinstance(lookup, str):
            through = lookup
        else:
            return None
        related = _related_model(type(first), through)
        if related is None or LOOKUP_SEP in through:
            return None
        if queryset is not None and queryset._prefetch_related_lookups:
            return None
        if queryset is not None and queryset._db:
            found.add(str(queryset._db))
        else:
            found.add(str(router.db_for_read(related, instance=first)))
    return found.pop() if len(found) == 1 else None


def _generator_alias(gen: types.GeneratorType[Any, None, None]) -> str:
    # A generator that has not started yet holds its arguments in its frame:
    # BaseIterable.__iter__(self) keeps the iterable, which knows its queryset.
    frame = gen.gi_frame
    owner = frame.f_locals.get("self") if frame is not None else None
    queryset = getattr(owner, "queryset", None)
    if isinstance(queryset, QuerySet | RawQuerySet):
        return str(queryset.db)
    return DEFAULT_DB_ALIAS


_MISSING = object()

# Model methods whose database Django asks the routers for unless ``using``
# says it (their a* versions always pass ``using=``, None by default).
_MODEL_USING = frozenset({"save", "delete", "refresh_from_db"})

# QuerySet methods that stock Django answers from the rows the queryset has
# already read, when it has (no query, and no router asked for its database).
_FROM_CACHE = frozenset({"_fetch_all", "count", "exists", "contains"})

# QuerySet methods that clear its result cache once they have written.
_CLEARS_CACHE = frozenset({"update", "delete"})


_DJANGO_61 = django.VERSION >= (6, 1)

# The iterables Django's in_bulk() reads rows with (others: TypeError).
_IN_BULK_ITERABLES: tuple[type[Any], ...] = (
    (ModelIterable, ValuesIterable, ValuesListIterable, FlatValuesListIterable)
    if _DJANGO_61
    else (ModelIterable,)
)

# Containers whose emptiness is told without running anything (``not qs``
# on a QuerySet given as ``id_list`` would run its query on the loop).
_SIZED = (list, tuple, set, frozenset, dict)


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> Any:
    return args[0] if args else kwargs.get(name)


def _answered_before_routing(
    qs: QuerySet[Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bool:
    """Whether Django's *name* on *qs* returns or raises before it asks the
    routers for a database: an empty ``in_bulk()``, ``bulk_create()`` or
    ``bulk_update()``; a ``contains()`` Django refuses, or answers False for an
    object of another model. Such a call runs as stock Django, asking the
    routers nothing (a round-robin router's next answer stays the next
    call's; a router that raises is not reached)."""
    query = qs.query
    if name == "in_bulk":
        ids = _argument(args, kwargs, "id_list")
        return (isinstance(ids, _SIZED) and not ids) or _in_bulk_refused(
            qs, kwargs.get("field_name", "pk")
        )
    if name in ("bulk_create", "bulk_update"):
        objs = _argument(args, kwargs, "objs")
        batch_size = kwargs.get("batch_size")
        # (Both refuse a batch size below 1 first, and bulk_create() a
        # multi-table inherited model: ValueError.)
        return (
            (isinstance(objs, _SIZED) and not objs)
            or (isinstance(batch_size, int) and batch_size <= 0)
            or (name == "bulk_create" and _multi_table(qs.model))
        )
    if name == "contains":
        obj = _argument(args, kwargs, "obj")
        if query.combinator or qs._fields is not None:  # type: ignore[attr-defined]
            return True
        return (
            not isinstance(obj, Model)
            or obj._meta.concrete_model != qs.model._meta.concrete_model
            or not obj._is_pk_set()  # type: ignore[attr-defined]
            # (Its filter(pk=...) refuses a sliced queryset: TypeError.)
            or query.is_sliced
        )
    if name in ("update", "delete"):
        # Refused (TypeError) before they name the database they write
        # (update() after distinct(*fields) from Django 6.1). Exactly: a call
        # answered None runs as stock - on the request's thread, outside the
        # set's blocks - so one that would write must never be taken for one.
        return bool(
            query.combinator
            or query.is_sliced
            or (query.distinct_fields and (name == "delete" or _DJANGO_61))
            or (name == "delete" and qs._fields is not None)  # type: ignore[attr-defined]
        )
    return False


def _ids_read_first(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``in_bulk()``'s ``id_list`` is a queryset Django will run (its
    rows not read yet) before it names the database of its own rows."""
    ids = _argument(args, kwargs, "id_list")
    return isinstance(ids, QuerySet | RawQuerySet) and ids._result_cache is None  # type: ignore[union-attr]


def _in_bulk_refused(qs: QuerySet[Any], field_name: Any) -> bool:
    """Whether Django's ``in_bulk(field_name=field_name)`` on *qs* raises
    before it asks the routers: a sliced queryset, (before Django 6.1) a
    values() one, a field that is not unique or does not exist. (A call
    taken for refused must be refused: it would run as stock, outside blocks.)"""
    query = qs.query
    if query.is_sliced:
        return True
    # (Django 6.1 reads values() querysets by ids too, and refuses other
    # iterables after the field's check below: before routing, either way.)
    if not issubclass(qs._iterable_class, _IN_BULK_ITERABLES):
        return True
    if field_name == "pk":
        return False
    opts = qs.model._meta
    try:
        field = opts.get_field(field_name)
    except (FieldDoesNotExist, TypeError):
        return True
    unique = [c.fields[0] for c in opts.total_unique_constraints if len(c.fields) == 1]
    return not (
        field.unique or field_name in unique or query.distinct_fields == (field_name,)
    )


def _multi_table(model: type[Model]) -> bool:
    return any(
        parent._meta.concrete_model is not model._meta.concrete_model
        for parent in model._meta.get_parent_list()
    )


def _refreshes_nothing(instance: Model, fields: Any) -> bool:
    """Whether Django's ``refresh_from_db(fields=fields)`` returns or raises
    before it asks the routers: no field left once the prefetched relations
    named are dropped from their cache (it only drops them), or a field with
    ``__`` (ValueError). Such a call runs as stock, asking the routers
    nothing. (Only containers: an iterator read here would be used up.)"""
    if not isinstance(fields, _SIZED):
        return False
    prefetched = getattr(instance, "_prefetched_objects_cache", ())
    left = [name for name in fields if name not in prefetched]
    return not left or any(LOOKUP_SEP in name for name in left)


def _stand_in(owner: Any, alias: str) -> Any:
    """A copy of the (raw) queryset *owner* pinned to *alias*: its ``db`` is
    *alias*, not a fresh answer of the routers. (Not ``copy.copy()``: a
    QuerySet's ``__getstate__`` evaluates it.)"""
    if isinstance(owner, QuerySet):
        owner.query  # noqa: B018  (applies a deferred filter once, here)
    stand_in = object.__new__(type(owner))
    stand_in.__dict__.update(owner.__dict__)
    stand_in._db = alias
    return stand_in


def _on_stand_in(func: Any, owner: Any, alias: str) -> Callable[..., Any]:
    stand_in = _stand_in(owner, alias)
    method = types.MethodType(func.__func__, stand_in)
    before = dict(stand_in.__dict__)

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            result = method(*args, **kwargs)
        finally:
            # What the call set on the queryset (its result cache, _for_write)
            # is set on the caller's, as if it had run there - but not _db, and
            # only what this call changed: a gathered call on the same
            # queryset may have filled its result cache since the stand-in was
            # copied, and this one's stale None must not undo it.
            state = owner.__dict__
            for key, value in stand_in.__dict__.items():
                if key != "_db" and before.get(key, _MISSING) is not value:
                    state[key] = value
        if func.__name__ in _CLEARS_CACHE:
            # They end by clearing the result cache (None before and after on
            # the stand-in, so not copied above): the caller's too, as stock.
            state["_result_cache"] = None
        return result

    call.__name__ = func.__name__  # (the call's records name Django's method)
    return call


def pinned(
    func: Callable[..., Any], kwargs: dict[str, Any], target: Target
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """*func* and *kwargs* run against ``target.alias``, the database the
    routers named for the call as :func:`target_of` asked them, so that Django
    does not ask them a second time on the lane's thread: a router whose
    answer changes from call to call (Django's documented replica router,
    ``random.choice``) would send the queries of a lane leased for one
    database to a connection of another, opened on the lane's thread outside
    the set's budget, outside the lane's blocks and snapshot. Stock Django
    asks the routers once per call too, with the same hints. Calls whose
    databases are not one alias the routers named (lane-0 calls, a second
    database) run as they are - but a (raw) queryset's own rows are read
    where the routers named, as on stock, even when its prefetches send the
    call to lane 0 (their querysets ask the routers there, as on stock)."""
    if not router.routers or target.also:
        return func, kwargs
    owner = getattr(func, "__self__", None)
    # A lane-0 call's databases are Django's to decide on lane 0, except a
    # queryset's own: target.alias is the one answer asked for them, as stock.
    if (target.lane0 or target.scope) and not isinstance(owner, QuerySet | RawQuerySet):
        return func, kwargs
    if target.lane0 and getattr(func, "__name__", "") == "in_bulk":
        if _ids_read_first((), kwargs):
            return func, kwargs  # (Django asks the routers, in its order)
    if target.cursor is not None:
        # aiterator(): pin the queryset its iterable will read, before the
        # generator starts (afterwards it has asked for its database).
        gen = target.cursor
        frame = gen.gi_frame
        if frame is not None and inspect.getgeneratorstate(gen) == inspect.GEN_CREATED:
            iterable = frame.f_locals.get("self")
            queryset = getattr(iterable, "queryset", None)
            if isinstance(queryset, QuerySet | RawQuerySet) and not getattr(
                queryset, "_db", None
            ):
                iterable.queryset = _stand_in(queryset, target.alias)  # type: ignore[union-attr]
        return func, kwargs
    if isinstance(owner, QuerySet | RawQuerySet):
        base = QuerySet if isinstance(owner, QuerySet) else RawQuerySet
        if (
            getattr(owner, "_db", None)
            or not isinstance(getattr(func, "__func__", None), types.FunctionType)
            # A subclass's own db property may not answer _db (nor the
            # routers): pinned, its calls would go to another database.
            or type(owner).db is not base.db
        ):
            return func, kwargs
        return _on_stand_in(func, owner, target.alias), kwargs
    name = getattr(func, "__name__", "")
    if (
        isinstance(owner, Model)
        and name in _MODEL_USING
        # Django's own method: an override may take using=None as its own
        # default (save(using=using or "audit")), which an alias would undo.
        and getattr(func, "__func__", None) is getattr(Model, name)
        and "using" in kwargs
        and kwargs["using"] is None
        # refresh_from_db(from_queryset=qs): target_of read qs.db; Django's
        # using= runs qs.using(alias), which asks the routers no second time.
        and (
            kwargs.get("from_queryset") is None
            or isinstance(kwargs["from_queryset"], QuerySet)
        )
    ):
        return func, {**kwargs, "using": target.alias}
    return func, kwargs


def target_of(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Target | None:
    """Return where *func* will run its queries, or None when it is no ORM call
    this library knows (the call then runs as stock Django)."""
    owner = getattr(func, "__self__", None)
    name = getattr(func, "__name__", "")
    if isinstance(owner, QuerySet):
        if (
            name in _FROM_CACHE
            and getattr(owner, "_result_cache", None) is not None
            and (
                not getattr(owner, "_prefetch_related_lookups", ())
                or getattr(owner, "_prefetch_done", False)
            )
        ):
            # Answered from its result cache: asking the routers for its
            # database here would ask them once more than stock Django does (a
            # router whose answer changes per call would answer the next call
            # otherwise). It runs as stock, querying nothing.
            return None
        if _answered_before_routing(owner, name, args, kwargs):
            return None
        if name == "in_bulk" and _ids_read_first(args, kwargs):
            # Django runs a queryset of ids (``not id_list``) before it asks
            # the routers for its own database: their first answer is the
            # ids' query's, made as it runs. Asked here, the answers would
            # come in another order (another replica read with a round-robin
            # router, the ids of one database looked up in another): it runs
            # as stock, on lane 0 (inside blocks, on their lane), unpinned.
            return _anywhere(str(owner._db or DEFAULT_DB_ALIAS))  # type: ignore[attr-defined]
        if (
            name == "bulk_create"
            and not owner._db  # type: ignore[attr-defined]
            and not owner._for_write  # type: ignore[attr-defined]
        ):
            # Django's bulk_create() checks its options against the features
            # of connections[self.db] before it marks the queryset for
            # writing: it asks db_for_read once, then db_for_write for its
            # rows. Both are asked here, in that order (a round-robin replica
            # router's next read answer is this call's, as on stock).
            read = _queryset_alias(owner, False)
            if read not in connections.settings:
                return Target(read)  # (its lane raises Django's error)
        alias = _queryset_alias(owner, name in _WRITES)
        if (
            name == "in_bulk"
            and not owner._db  # type: ignore[attr-defined]
            and _argument(args, kwargs, "id_list") is not None
        ):
            # Django's in_bulk(id_list) asks the routers twice: for the
            # database whose backend sizes its batches (connections[self.db],
            # which raises for an unknown alias), then, as it reads them, for
            # the database of its rows. Both answers are asked here, in that
            # order, and the rows are read from the second, as on stock.
            if alias not in connections.settings:
                return Target(alias)  # (its lane raises Django's error)
            alias = _queryset_alias(owner, False)
        lookups = getattr(owner, "_prefetch_related_lookups", ())
        if lookups and name in _FETCHES:
            # The rows' related querysets go where the routers send them.
            target = _prefetch_target(owner.model, alias, lookups)
            if target.alias != alias or target.lane0:
                return _anywhere(alias)
        return Target(alias)
    if isinstance(owner, RawQuerySet):
        alias = str(owner.db)
        lookups = getattr(owner, "_prefetch_related_lookups", ())
        if lookups and name in _FETCHES and owner.model is not None:
            # Its prefetch_related() lookups too, as a QuerySet's above.
            target = _prefetch_target(owner.model, alias, lookups)
            if target.alias != alias or target.lane0:
                return _anywhere(alias)
        return Target(alias)
    if isinstance(owner, Model):
        using = kwargs.get("using")
        if using:
            return Target(str(using))
        if (
            name == "delete"
            and getattr(func, "__func__", None) is Model.delete
            and not owner._is_pk_set()  # type: ignore[attr-defined]
        ):
            # Django's delete() refuses an unsaved object before it asks the
            # routers (ValueError): as stock, they are not asked.
            return None
        if (
            name == "refresh_from_db"
            and getattr(func, "__func__", None) is Model.refresh_from_db
            and _refreshes_nothing(owner, kwargs.get("fields"))
        ):
            return None
        if name == "refresh_from_db":
            # Where Django's refresh_from_db reads: from_queryset's database,
            # else the routers' for the instance (which fall back to the
            # database the instance came from).
            from_queryset = kwargs.get("from_queryset")
            if isinstance(from_queryset, QuerySet):
                alias = from_queryset.db
            else:
                alias = router.db_for_read(type(owner), instance=owner)
        else:
            alias = router.db_for_write(type(owner), instance=owner)
        return Target(str(alias))
    if isinstance(owner, Manager):
        # (Only related managers hand their own methods to sync_to_async.)
        instance = getattr(owner, "instance", None)
        if isinstance(instance, Model) and name in _WRITES:
            return _related_manager_target(owner, instance, name, args, kwargs)
        return Target(_queryset_alias(owner, name in _WRITES))
    if func is prefetch_related_objects:
        instances = args[0] if args else kwargs.get("model_instances")
        first = next(iter(instances), None) if instances else None
        if not isinstance(first, Model):
            return Target(DEFAULT_DB_ALIAS)  # (no query, or Django's own error)
        # Each lookup's queryset goes where a Prefetch's queryset says, else
        # where the routers send its model with the first instance as hint
        # (without routers: the database that instance came from).
        alias = str(first._state.db or DEFAULT_DB_ALIAS)
        target = _prefetch_target(type(first), alias, args[1:])
        if target.lane0 and router.routers:
            return replace(
                target, routed=functools.partial(_routed_alias, first, args[1:])
            )
        return target
    if args and isinstance(args[0], types.GeneratorType):
        return Target(_generator_alias(args[0]), cursor=args[0])
    return None
