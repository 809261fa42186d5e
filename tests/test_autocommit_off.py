"""``AUTOCOMMIT = False`` for a database: why check ``asgi_dbset.E018`` refuses it.

Without autocommit, Django opens a transaction on every connection at its
first query, and the program commits it on the request's thread
(``transaction.commit()``). Stock Django runs every call of the request on
that one connection: three writes, then a commit, keep three rows. Calls on
extra lanes write in the lanes' own transactions, which that commit never
reaches: the request's queries do not see them and they are rolled back when
the lanes return their connections. Run in a process of its own, with the
suite's test database configured that way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.one_database import SETUP, suite_database

pytestmark = pytest.mark.django_db(transaction=True)

WRITES_THEN_COMMIT = """
import asyncio

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connections, transaction

from asgi_dbset import connection_set
from tests.helpers import checked_out
from tests.testapp.models import Author


async def writes(tag):
    await asyncio.gather(*(Author.objects.acreate(name=f"{tag}{i}") for i in range(3)))
    seen = await Author.objects.filter(name__startswith=tag).acount()
    await sync_to_async(transaction.commit)()
    return seen


async def request(tag, parallelism):
    async with ThreadSensitiveContext():
        if parallelism is None:  # stock Django: no set
            seen, lanes = await writes(tag), []
        else:
            async with connection_set(parallelism=parallelism, lease_timeout=5.0) as dbset:
                seen = await writes(tag)
            lanes = sorted({record.lane for record in dbset.records})
        await sync_to_async(connections.close_all)()
    return seen, lanes


async def main():
    # (Bounded: a hang fails the test instead of the suite.)
    stock = await asyncio.wait_for(request("stock", None), 60)
    lanes = await asyncio.wait_for(request("lanes", 3), 60)
    return stock, lanes


stock, lanes = asyncio.run(main())
rows = {
    tag: Author.objects.filter(name__startswith=tag).count()
    for tag in ("stock", "lanes")
}
Author.objects.all().delete()
transaction.commit()
connections.close_all()
print(json.dumps({
    "stock": stock,
    "lanes": lanes,
    "rows": rows,
    "checked_out": checked_out(),
}))
"""

# What the process would do if asgi_dbset let it start: its settings check
# (which refuses the configuration at django.setup()) is skipped.
WITHOUT_THE_CHECK = """
import asgi_dbset.checks
asgi_dbset.checks.check_settings = lambda *args, **kwargs: []
django.setup()
"""


def run(script: str, database: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, json.dumps(database)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_writes_on_extra_lanes_without_autocommit_are_refused_at_startup() -> None:
    database = suite_database(min_size=3)
    database["AUTOCOMMIT"] = False
    # Refused loudly at startup, with what to write instead.
    refused = run(SETUP + "print('started')", database)
    assert refused.returncode != 0
    assert "asgi_dbset.E018" in refused.stderr
    assert "MAX_PARALLELISM" in refused.stderr
    assert "started" not in refused.stdout

    # Why: what the requests would have done had it started.
    ran = run(
        SETUP.replace("django.setup()", WITHOUT_THE_CHECK) + WRITES_THEN_COMMIT,
        database,
    )
    assert ran.returncode == 0, ran.stderr
    figures = json.loads(ran.stdout.strip().splitlines()[-1])
    # Stock (every call on the request's connection): the request sees its
    # three writes, and its commit keeps them.
    assert figures["stock"] == [3, []]
    assert figures["rows"]["stock"] == 3
    # On three lanes, each write went into its lane's own transaction: the
    # request saw only lane 0's, and its commit kept only that one.
    assert figures["lanes"] == [1, [0, 1, 2]]
    assert figures["rows"]["lanes"] == 1
    assert figures["checked_out"] == 0
