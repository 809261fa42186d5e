"""The ``ASGI_DBSET`` setting, read lazily so ``override_settings`` works.

Nothing is read at import time. The first read merges ``settings.ASGI_DBSET``
over :data:`DEFAULTS` and keeps the result until Django's ``setting_changed``
signal says the setting changed (``override_settings`` sends it), as Django's
own modules keep the settings they derive. Values are validated by the system
checks in :mod:`asgi_dbset.checks`; the properties return them as written.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed

DEFAULTS: dict[str, Any] = {
    # Parallelism of a request whose view sets none.
    "DEFAULT_PARALLELISM": 1,
    # Upper bound for any request's parallelism, including @db_parallelism(n).
    "MAX_PARALLELISM": 8,
    # Extra connections that all sets of the process may hold together.
    # None: half of each alias's pool (max_size // 2).
    "BUDGET": None,
    # Seconds a set waits for the pool when it asks for an extra connection.
    "LEASE_TIMEOUT": 0.1,
    # Seconds of server time each query of a set may take; None: no limit.
    "STATEMENT_TIMEOUT": None,
    # Add a Server-Timing header with the set's figures to every response.
    "SERVER_TIMING": False,
    # How many finished requests to keep for asgi_dbset.recent_requests().
    "HISTORY": 0,
    # Database aliases behind a transaction-pooling PgBouncer (or any pooler
    # that gives a client a server session per transaction only).
    "TRANSACTION_POOLED": (),
}


class Settings:
    """Typed, lazy view of ``settings.ASGI_DBSET`` merged over :data:`DEFAULTS`."""

    def __init__(self) -> None:
        self._snapshot: Mapping[str, Any] | None = None

    @property
    def raw(self) -> Any:
        return getattr(django_settings, "ASGI_DBSET", {})

    def snapshot(self) -> Mapping[str, Any]:
        """Every setting, read-only: read once, then kept until it changes."""
        values = self._snapshot
        if values is None:
            raw = self.raw
            merged = {**DEFAULTS, **raw} if isinstance(raw, dict) else dict(DEFAULTS)
            values = self._snapshot = MappingProxyType(merged)
        return values

    def forget(self) -> None:
        """Read the setting again at the next access."""
        self._snapshot = None

    def _get(self, name: str) -> Any:
        return self.snapshot()[name]

    @property
    def DEFAULT_PARALLELISM(self) -> int:  # noqa: N802 - mirrors the setting's key
        return int(self._get("DEFAULT_PARALLELISM"))

    @property
    def MAX_PARALLELISM(self) -> int:  # noqa: N802
        return int(self._get("MAX_PARALLELISM"))

    @property
    def BUDGET(self) -> int | None:  # noqa: N802
        value = self._get("BUDGET")
        return None if value is None else int(value)

    @property
    def LEASE_TIMEOUT(self) -> float:  # noqa: N802
        return float(self._get("LEASE_TIMEOUT"))

    @property
    def STATEMENT_TIMEOUT(self) -> float | None:  # noqa: N802
        value = self._get("STATEMENT_TIMEOUT")
        return None if value is None else float(value)

    @property
    def SERVER_TIMING(self) -> bool:  # noqa: N802
        return bool(self._get("SERVER_TIMING"))

    @property
    def HISTORY(self) -> int:  # noqa: N802
        return int(self._get("HISTORY"))

    @property
    def TRANSACTION_POOLED(self) -> frozenset[str]:  # noqa: N802
        return frozenset(self._get("TRANSACTION_POOLED"))


conf = Settings()


def _setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "ASGI_DBSET":
        conf.forget()


setting_changed.connect(_setting_changed)
