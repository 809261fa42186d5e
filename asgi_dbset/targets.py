"""What an async ORM call will touch: its database alias, and its cursor if any.

Django's async entry points all end in ``sync_to_async(f)(*args, **kwargs)``
where ``f`` is a bound method of a QuerySet, RawQuerySet, model instance or
related manager, ``prefetch_related_objects``, or ``aiterator()``'s local
``next_slice(generator)``. This module reads the alias from those objects the
way Django itself will (routers included) without running any query.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import DEFAULT_DB_ALIAS, router
from django.db.models import Manager, Model, QuerySet
from django.db.models.query import RawQuerySet, prefetch_related_objects

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
    many-to-many ``acreate`` whose link table lives apart from its model)."""

    alias: str
    cursor: types.GeneratorType[Any, None, None] | None = None
    scope: str | None = None
    also: str | None = None


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
    manager: Manager[Any], instance: Model, name: str
) -> Target:
    """Where Django's related manager method *name* writes: each of them asks
    the routers itself, with only the manager's instance as hint - never the
    manager's own ``_db`` or hints (``db_manager()``)."""
    through = getattr(manager, "through", None)
    if through is None:
        # Reverse foreign key and generic relation managers: the related model.
        return Target(str(router.db_for_write(manager.model, instance=instance)))
    # Many-to-many: the links are written where the routers send the through
    # model, which need not be where they send either end of the relation.
    links = str(router.db_for_write(through, instance=instance))
    if name in _LINK_WRITES:
        return Target(links)
    # create(), get_or_create(), update_or_create(): the object is written
    # where the routers send the *instance's* model, then linked (add()).
    alias = str(router.db_for_write(type(instance), instance=instance))
    return Target(alias, also=None if links == alias else links)


def _generator_alias(gen: types.GeneratorType[Any, None, None]) -> str:
    # A generator that has not started yet holds its arguments in its frame:
    # BaseIterable.__iter__(self) keeps the iterable, which knows its queryset.
    frame = gen.gi_frame
    owner = frame.f_locals.get("self") if frame is not None else None
    queryset = getattr(owner, "queryset", None)
    if isinstance(queryset, QuerySet | RawQuerySet):
        return str(queryset.db)
    return DEFAULT_DB_ALIAS


def target_of(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Target | None:
    """Return where *func* will run its queries, or None when it is no ORM call
    this library knows (the call then runs as stock Django)."""
    owner = getattr(func, "__self__", None)
    name = getattr(func, "__name__", "")
    if isinstance(owner, QuerySet):
        return Target(_queryset_alias(owner, name in _WRITES))
    if isinstance(owner, RawQuerySet):
        return Target(str(owner.db))
    if isinstance(owner, Model):
        using = kwargs.get("using")
        if using:
            return Target(str(using))
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
            return _related_manager_target(owner, instance, name)
        return Target(_queryset_alias(owner, name in _WRITES))
    if func is prefetch_related_objects:
        instances = args[0] if args else kwargs.get("model_instances")
        first = next(iter(instances), None) if instances else None
        instance_db = first._state.db if isinstance(first, Model) else None
        return Target(str(instance_db or DEFAULT_DB_ALIAS))
    if args and isinstance(args[0], types.GeneratorType):
        return Target(_generator_alias(args[0]), cursor=args[0])
    return None
