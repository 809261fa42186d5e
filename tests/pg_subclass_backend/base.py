"""A PostgreSQL backend of one's own, as django-prometheus, django-tenants or
PostGIS ship: a subclass of Django's, under another ENGINE name."""

from django.db.backends.postgresql.base import DatabaseWrapper as PostgreSQLWrapper


class DatabaseWrapper(PostgreSQLWrapper):
    pass
