"""How many extra connections the sets of this process may hold at once.

An *extra lane* is a connection a set leases beyond the request's own one. The
budget counts them per database alias and in total:

- per alias, never more than ``max_size - 1`` of that alias's pool: at least one
  pooled connection always remains for some request's own connection, so a
  request that waits for its own connection while other requests hold extra
  lanes is always eventually served (extra lanes are only taken with a short
  bounded wait, so their holders always make progress and give them back);
- in total, at most ``ASGI_DBSET["BUDGET"]`` when it is set; when it is not,
  each alias gets half of its pool;
- and only from what the process's requests leave over: every connection set
  open (a request in flight) may need a connection of its own, so an extra
  lane is taken only while ``open sets + extra lanes + 1 <= max_size``. Under
  light load a request gets its lanes; once the requests in flight could use
  the whole pool themselves (stock Django's saturation point), sets lease
  nothing more and run their calls as stock Django does, so parallelism
  never takes a connection that another request's own would need.

When that holds for every pooled alias at once (:meth:`Budget.saturated`: the
requests in flight need every connection of every pool), no set could lease,
and a set whose calls need nothing else of it lets them run exactly as stock
Django runs them (see ``ConnectionSet.call``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed

from . import stats
from .conf import conf

# psycopg_pool.ConnectionPool's own defaults.
POOL_MIN_SIZE = 4


def pool_options(alias: str) -> dict[str, Any] | None:
    """The ``OPTIONS["pool"]`` of *alias* as a dict, or None when it is not pooled."""
    options = settings.DATABASES.get(alias, {}).get("OPTIONS", {}).get("pool")
    if not options:
        return None
    return {} if options is True else dict(options)


def pool_max_size(alias: str) -> int | None:
    """The pool's ``max_size`` as psycopg_pool computes it, or None without a pool."""
    options = pool_options(alias)
    if options is None:
        return None
    min_size = int(options.get("min_size", POOL_MIN_SIZE))
    max_size = options.get("max_size")
    return min_size if max_size is None else int(max_size)


# Methods by which a schema-per-tenant backend (django-tenants,
# django-tenant-schemas, django-pgschemas) gives the request's connection
# object the tenant's schema, on the request's thread only.
_REQUEST_STATE_METHODS = ("set_tenant", "set_schema")


def keeps_request_state(alias: str) -> bool:
    """True when *alias*'s backend keeps per-request state on the request
    thread's connection object (a tenant's schema), which a lane's connection
    would not have: a query there would read another schema's rows."""
    from django.core.exceptions import ImproperlyConfigured
    from django.db.utils import load_backend

    engine = settings.DATABASES.get(alias, {}).get("ENGINE", "")
    try:
        wrapper = getattr(load_backend(engine), "DatabaseWrapper", None)
    except ImproperlyConfigured:
        return False  # (Django reports it at the first query)
    return any(hasattr(wrapper, name) for name in _REQUEST_STATE_METHODS)


def pool_is_contended(alias: str) -> bool:
    """True when requests are waiting for a connection of *alias*'s pool now."""
    from django.db.backends.postgresql.base import DatabaseWrapper

    pool = getattr(DatabaseWrapper, "_connection_pools", {}).get(alias)
    if pool is None:
        return False
    return bool(pool.get_stats().get("requests_waiting", 0))


class Budget:
    """Counts extra lanes per alias; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()
        self._retry_at: dict[str, float] = {}
        # (limit(), the pool's max_size or 0) of each alias asked for, until
        # DATABASES or ASGI_DBSET changes; one dict, so one is never without
        # the other.
        self._limits: dict[str, tuple[int, int]] = {}
        # ASGI_DBSET["BUDGET"], read with the limits (and forgotten with them).
        self._total_limit: int | None = None
        # (alias, max_size) of every pooled alias, from _limits (None: not yet).
        self._pool_sizes: tuple[tuple[str, int], ...] | None = None
        # The aliases whose backend keeps_request_state (None: not worked out yet).
        self._request_state: frozenset[str] | None = None

    def back_off(self, alias: str, seconds: float) -> None:
        """No set leases for *alias* for ``seconds`` (after a refused lease)."""
        self._retry_at[alias] = time.monotonic() + seconds

    def retry_at(self, alias: str) -> float:
        return self._retry_at.get(alias, 0.0)

    def __repr__(self) -> str:
        held = ", ".join(f"{alias}={n}" for alias, n in sorted(self._held.items()))
        return f"<Budget held: {held or 'none'} total={self.total}>"

    @property
    def total(self) -> int:
        return sum(self._held.values())

    def held(self, alias: str) -> int:
        return self._held[alias]

    def limit(self, alias: str) -> int:
        """Extra lanes *alias* may have across the process (0 without a pool)."""
        return self._limit_and_size(alias)[0]

    def _limit_and_size(self, alias: str) -> tuple[int, int]:
        try:
            return self._limits[alias]
        except KeyError:
            pass
        max_size = pool_max_size(alias)
        budget = self._total_limit = conf.BUDGET
        if max_size is None or keeps_request_state(alias):
            # (No pool; or only the request's own connection has the state
            # its queries need: they all run on lane 0, as on stock Django.)
            limit = 0
        elif budget is None:
            limit = max_size // 2
        else:
            limit = max(0, min(budget, max_size - 1))
        self._limits[alias] = (limit, max_size or 0)
        return limit, max_size or 0

    def request_state_aliases(self) -> frozenset[str]:
        """The aliases whose backend :func:`keeps_request_state`: only the
        request's own connection of each may run their queries."""
        found = self._request_state
        if found is None:
            found = self._request_state = frozenset(
                alias for alias in settings.DATABASES if keeps_request_state(alias)
            )
        return found

    def forget_limits(self) -> None:
        """Work the limits out again at the next use (the settings changed)."""
        self._limits.clear()
        self._pool_sizes = None
        self._request_state = None

    def saturated(self) -> bool:
        """True when no alias could lend an extra lane because the requests in
        flight need every connection of its pool (``open sets + extra lanes +
        1 > max_size`` for each pooled alias; False without a pool). A hint,
        without the lock, asked once per ORM call of a set that has no extra
        lane: two dict reads per alias."""
        sizes = self._pool_sizes
        if sizes is None:
            # (Read through the limits: one place works a pool's size out.)
            sizes = self._pool_sizes = tuple(
                (alias, size)
                for alias in settings.DATABASES
                if (size := self._limit_and_size(alias)[1])
            )
        if not sizes:
            return False
        open_now = stats.sets_open_now()
        held = self._held
        return all(held.get(alias, 0) + open_now + 1 > size for alias, size in sizes)

    def may_acquire(self, alias: str) -> bool:
        """True if :meth:`try_acquire` would succeed now (a hint: other
        threads may take the room first)."""
        # Without the lock (a hint either way, asked on every queued call):
        # each read of the counts is one dict operation, atomic under the GIL.
        return self._has_room(alias)

    def try_acquire(self, alias: str) -> bool:
        """Take one extra lane for *alias* if the budget allows, without waiting."""
        with self._lock:
            if not self._has_room(alias):
                return False
            self._held[alias] += 1
            return True

    def _has_room(self, alias: str) -> bool:
        # (First: working a limit out sets _total_limit.)
        limit, max_size = self._limit_and_size(alias)
        # (.get: release() drops an alias at zero; a Counter's [] of a missing
        # key is a Python call.)
        held = self._held.get(alias, 0)
        if held >= limit:
            return False
        # Every request in flight keeps room for its own connection: the new
        # lane only takes one that the open sets' own ones leave over.
        if held + stats.sets_open_now() + 1 > max_size:
            return False
        total = self._total_limit  # (checked at startup: None or int)
        return total is None or self.total < total

    def release(self, alias: str) -> None:
        with self._lock:
            self._held[alias] -= 1
            if self._held[alias] <= 0:
                del self._held[alias]


budget = Budget()


def _setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in ("DATABASES", "ASGI_DBSET"):
        budget.forget_limits()


setting_changed.connect(_setting_changed)
