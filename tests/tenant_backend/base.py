"""A schema-per-tenant backend built as django-tenants builds its own: the
request's middleware calls ``connection.set_schema(name)`` on the request's
thread, and every cursor of that connection object first sets the
``search_path`` to the tenant's schema (then public)."""

from __future__ import annotations

from typing import Any

from django.db.backends.postgresql.base import DatabaseWrapper as PostgreSQLWrapper


class DatabaseWrapper(PostgreSQLWrapper):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schema_name = "public"
        self._search_path_set: str | None = None

    def set_schema(self, schema_name: str) -> None:
        self.schema_name = schema_name
        self._search_path_set = None

    def _cursor(self, name: str | None = None) -> Any:
        cursor = super()._cursor(name=name)
        if self._search_path_set != self.schema_name:
            # (django-tenants sets it on a cursor of its own for a named one.)
            with self.connection.cursor() as setter:
                setter.execute(f'SET search_path = "{self.schema_name}", public')
            self._search_path_set = self.schema_name
        return cursor

    def close(self) -> None:
        self._search_path_set = None  # (a pooled connection may come back)
        super().close()
