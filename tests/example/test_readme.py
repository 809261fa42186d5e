"""The README's usage samples run as copied.

The five files of its minimal project are written out as they are, and served
through their own ``mysite.asgi.application`` in a process of their own; only
the database's address is changed, to a scratch database on the suite's
server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.db import connections
from psycopg import sql

REPO = Path(__file__).resolve().parents[2]

SERVE = """
import asyncio, json, os, sys

sys.path.insert(0, os.getcwd())
from mysite.asgi import application  # the README's asgi.py: it sets up Django

from django.core.management import call_command
from shop.models import Customer, Order

call_command("migrate", run_syncdb=True, verbosity=0)
ada = Customer.objects.create(name="Ada", spent=120)
Customer.objects.create(name="Bob", spent=30)
Order.objects.create(customer=ada)


async def get(path):
    sent, body, done = [], [], asyncio.Event()

    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()  # the client stays until it has the response
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            body.append(message["status"])
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 1), "server": ("localhost", 80),
    }
    await application(scope, receive, send)
    return body[0], json.loads(b"".join(body[1:]))


status, data = asyncio.run(get("/dashboard/"))
from django.db import connections
connections.close_all()
print(json.dumps({"status": status, "data": data}))
"""


def readme_files() -> dict[str, str]:
    """path -> source of each README block that starts with ``# <path>.py``."""
    text = (REPO / "README.md").read_text()
    files = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        first = block.splitlines()[0]
        match = re.fullmatch(r"# (\w+/\w+\.py)", first)
        if match:
            files[match.group(1)] = block
    return files


@pytest.fixture
def scratch_database() -> Iterator[str]:
    name = f"readme_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )


def test_the_readme_names_the_five_files_of_its_project() -> None:
    assert sorted(readme_files()) == [
        "mysite/asgi.py",
        "mysite/settings.py",
        "mysite/urls.py",
        "shop/models.py",
        "shop/views.py",
    ]


def test_the_readmes_project_serves_its_dashboard(
    tmp_path: Path, scratch_database: str
) -> None:
    for path, source in readme_files().items():
        target = tmp_path / path
        target.parent.mkdir(exist_ok=True)
        (target.parent / "__init__.py").touch()
        target.write_text(source)
    # The one change: the database's address, for the suite's server.
    ours = connections["default"].settings_dict
    address = {key: ours[key] for key in ("USER", "PASSWORD", "HOST", "PORT")}
    with (tmp_path / "mysite/settings.py").open("a") as settings_file:
        settings_file.write(
            f"\nDATABASES['default'].update({address!r}, NAME={scratch_database!r})\n"
        )
    result = subprocess.run(
        [sys.executable, "-c", SERVE],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert served == {
        "status": 200,
        "data": {"customers": 2, "orders": 1, "top": {"name": "Ada"}},
    }
