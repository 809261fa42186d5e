"""Settings of the example shop that ``make demo`` serves.

The database is ``DATABASE_URL`` if set, else the embedded PostgreSQL in
``<repo>/.pgdata/`` (see ``example_site.dbserver``).
"""

from __future__ import annotations

import os
from pathlib import Path

from example_site.dbserver import database_url, django_database

BASE_DIR = Path(__file__).resolve().parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-site-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "asgi_dbset",
    "example_site.shop",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]

ROOT_URLCONF = "example_site.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": []},
    }
]

DATABASES = {
    "default": django_database(
        database_url(),
        pool={"min_size": 4, "max_size": 20},
        application_name="asgi_dbset_example",
    )
}

ASGI_DBSET = {
    # A view that sets nothing runs as stock Django; the dashboard asks for 4.
    "DEFAULT_PARALLELISM": 1,
    "MAX_PARALLELISM": 8,
    # Keep the last 50 requests for the /timeline/ page.
    "HISTORY": 50,
    # Each response tells the browser's network panel how its queries ran.
    "SERVER_TIMING": True,
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        # ASGI_DBSET_LOG_LEVEL=DEBUG shows every set and lease; warnings (a
        # rolled-back or discarded connection, a fallback) show by default.
        "asgi_dbset": {
            "handlers": ["console"],
            "level": os.environ.get("ASGI_DBSET_LOG_LEVEL", "INFO"),
        }
    },
}
