"""Scripts run in a process of their own, configured with one database.

The suite's settings have two aliases; a project usually has one, and some
paths (and some faults) only show in a process configured that way. The
script gets ``SETUP`` first, so Django is set up with ``database`` as its
only alias; it prints its figures as JSON on its last line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from django.db import connections

SETUP = """
import json, sys

import django
from django.conf import settings

databases = json.loads(sys.argv[1])
settings.configure(
    # (One alias's settings; or, given as {"default": ..., ...}, every alias's.)
    DATABASES=databases if "default" in databases else {"default": databases},
    INSTALLED_APPS=[
        "django.contrib.contenttypes",
        "django.contrib.auth",
        "asgi_dbset",
        "tests.testapp",
    ],
    USE_TZ=True,
    DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
)
django.setup()
"""


def suite_database(**pool: Any) -> dict[str, Any]:
    """The suite's default alias (its test database), with *pool* options
    changed."""
    settings_dict = connections["default"].settings_dict
    database = {
        key: settings_dict[key]
        for key in ("ENGINE", "NAME", "USER", "PASSWORD", "HOST", "PORT")
    }
    options = dict(settings_dict["OPTIONS"])
    options["pool"] = {**options["pool"], **pool}
    database["OPTIONS"] = options
    return database


def run_with_one_database(
    script: str, database: dict[str, Any], *args: str, timeout: float = 120
) -> dict[str, Any]:
    """Run ``SETUP + script`` with *database* as the only alias; its figures."""
    result = subprocess.run(
        [sys.executable, "-c", SETUP + script, json.dumps(database), *args],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures
