"""One test per system check id, and `manage.py check` failing on errors."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connections
from django.db.backends.postgresql.base import DatabaseWrapper
from django.test import override_settings
from psycopg_pool import ConnectionPool

from asgi_dbset import DBSetMiddleware
from asgi_dbset.budget import budget
from asgi_dbset.checks import check_settings


def ids(**overrides: Any) -> list[str]:
    """The ids the checks report under ``overrides``, one per distinct id."""
    with warnings.catch_warnings():
        # Django warns that overriding DATABASES is unusual; here it is the point.
        warnings.filterwarnings("ignore", "Overriding setting DATABASES", UserWarning)
        with override_settings(**overrides):
            return sorted({str(message.id) for message in check_settings()})


def databases(**changes: Any) -> dict[str, Any]:
    """The test DATABASES with ``changes`` applied to 'default'."""
    dbs = copy.deepcopy(settings.DATABASES)
    for key, value in changes.items():
        if key == "pool":
            if value is None:
                dbs["default"]["OPTIONS"].pop("pool")
            else:
                dbs["default"]["OPTIONS"]["pool"] = value
        else:
            dbs["default"][key] = value
    return dbs


def test_the_test_settings_pass() -> None:
    assert check_settings() == []


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ([("DEFAULT_PARALLELISM", 2)], "asgi_dbset.E001"),
        ({"MAX_PARALELISM": 4}, "asgi_dbset.E002"),
        ({"DEFAULT_PARALLELISM": 0}, "asgi_dbset.E003"),
        ({"DEFAULT_PARALLELISM": True}, "asgi_dbset.E003"),
        ({"MAX_PARALLELISM": "8"}, "asgi_dbset.E004"),
        ({"MAX_PARALLELISM": -1}, "asgi_dbset.E004"),
        ({"DEFAULT_PARALLELISM": 4, "MAX_PARALLELISM": 2}, "asgi_dbset.E005"),
        ({"BUDGET": 0}, "asgi_dbset.E006"),
        ({"BUDGET": 2.5}, "asgi_dbset.E006"),
        ({"LEASE_TIMEOUT": -1}, "asgi_dbset.E007"),
        ({"LEASE_TIMEOUT": "fast"}, "asgi_dbset.E007"),
        ({"BUDGET": 8}, "asgi_dbset.E010"),
        ({"SERVER_TIMING": "yes"}, "asgi_dbset.E012"),
        ({"SERVER_TIMING": 1}, "asgi_dbset.E012"),
        ({"HISTORY": -1}, "asgi_dbset.E013"),
        ({"HISTORY": "50"}, "asgi_dbset.E013"),
    ],
)
def test_bad_asgi_dbset_settings(setting: Any, expected: str) -> None:
    assert ids(ASGI_DBSET=setting) == [expected]


def test_unknown_key_suggests_the_right_one() -> None:
    with override_settings(ASGI_DBSET={"MAX_PARALELISM": 4}):
        (message,) = check_settings()
    assert "MAX_PARALLELISM" in str(message.hint)


def test_an_alias_without_a_pool() -> None:
    assert ids(DATABASES=databases(pool=None)) == ["asgi_dbset.E008"]
    # Without parallelism there is nothing to pool for.
    assert ids(DATABASES=databases(pool=None), ASGI_DBSET={"MAX_PARALLELISM": 1}) == []


def test_conn_max_age_with_a_pool() -> None:
    assert ids(DATABASES=databases(CONN_MAX_AGE=60)) == ["asgi_dbset.E009"]


def test_a_non_postgresql_alias_is_a_warning() -> None:
    dbs = copy.deepcopy(settings.DATABASES)
    dbs["legacy"] = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}
    assert ids(DATABASES=dbs) == ["asgi_dbset.W002"]


# A backend built on Django's PostgreSQL one (as PostGIS, django-prometheus and
# django-tenants ship): its pool lends lanes like the stock backend's.
SUBCLASS = "tests.pg_subclass_backend"


def test_a_postgresql_subclass_backend_is_postgresql() -> None:
    # It ran in parallel while W002 said "one at a time", and went unchecked.
    assert ids(DATABASES=databases(ENGINE=SUBCLASS)) == []
    assert ids(DATABASES=databases(ENGINE=SUBCLASS, pool=None)) == ["asgi_dbset.E008"]
    # Django refuses CONN_MAX_AGE with a pool only at the first query.
    assert ids(DATABASES=databases(ENGINE=SUBCLASS, CONN_MAX_AGE=60)) == [
        "asgi_dbset.E009"
    ]
    assert ids(DATABASES=databases(ENGINE=SUBCLASS), ASGI_DBSET={"BUDGET": 8}) == [
        "asgi_dbset.E010"
    ]


# A schema-per-tenant backend, as django-tenants builds it: the tenant's schema
# lives on the request's connection object, which a lane's connection is not.
TENANTS = "tests.tenant_backend"


def test_a_schema_per_tenant_backend_runs_one_call_at_a_time() -> None:
    assert ids(DATABASES=databases(ENGINE=TENANTS)) == ["asgi_dbset.W005"]
    # (Parallelism 1 runs every call on the request's connection anyway.)
    one = {"MAX_PARALLELISM": 1, "DEFAULT_PARALLELISM": 1}
    assert ids(DATABASES=databases(ENGINE=TENANTS), ASGI_DBSET=one) == []
    # And the budget lends it no extra lane, so it never has one to run on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Overriding setting DATABASES", UserWarning)
        with override_settings(DATABASES=databases(ENGINE=TENANTS)):
            assert budget.limit("default") == 0
        assert budget.limit("default") > 0


@pytest.mark.parametrize(
    "pool",
    [
        "yes",
        1,
        {"max_size": "20"},
        {"min_size": None, "max_size": 8},
        {"max_size": 2},  # below min_size's default, 4
        {"min_size": -1, "max_size": 2},
        {"min_size": 0, "max_size": 0},
    ],
)
def test_pool_options_psycopg_pool_refuses(pool: Any) -> None:
    # Django makes the pool at the first query, where psycopg_pool refuses
    # them; the checks crashed on some of them (int("lots")).
    assert ids(DATABASES=databases(pool=pool)) == ["asgi_dbset.E017"]


def test_a_pool_options_error_says_what_to_write() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Overriding setting", UserWarning)
        with override_settings(DATABASES=databases(pool={"max_size": 2})):
            (message,) = check_settings()
    assert "max_size 2 below its min_size 4" in message.msg
    assert '"max_size": 20' in str(message.hint)


def test_a_pool_of_one_lends_no_lane() -> None:
    one = databases(pool={"min_size": 1, "max_size": 1})
    assert ids(DATABASES=one) == ["asgi_dbset.W004"]
    assert ids(DATABASES=one, ASGI_DBSET={"MAX_PARALLELISM": 1}) == []
    # With a BUDGET it is E010, whose hint cannot be "BUDGET at most 0".
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Overriding setting", UserWarning)
        with override_settings(DATABASES=one, ASGI_DBSET={"BUDGET": 1}):
            (message,) = check_settings()
    assert message.id == "asgi_dbset.E010"
    assert str(message.hint).startswith("Raise DATABASES['default']")


def test_an_orm_module_that_cannot_be_routed(monkeypatch: pytest.MonkeyPatch) -> None:
    import django.db.models.query

    from asgi_dbset.checks import check_routing

    assert check_routing() == []

    def another_librarys_sync_to_async(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("not called")

    monkeypatch.setattr(
        django.db.models.query, "sync_to_async", another_librarys_sync_to_async
    )
    (message,) = check_routing()
    assert message.id == "asgi_dbset.W001"
    assert "django.db.models.query" in message.msg


def test_check_command_fails_on_errors() -> None:
    with override_settings(ASGI_DBSET={"MAX_PARALLELISM": 0}):
        with pytest.raises(SystemCheckError, match=r"asgi_dbset\.E004"):
            call_command("check")


def test_manage_py_check_fails_in_a_fresh_process() -> None:
    code = (
        "import django; from django.conf import settings; import tests.settings as s;"
        "values = {k: getattr(s, k) for k in dir(s) if k.isupper()};"
        "values['ASGI_DBSET'] = {**getattr(s, 'ASGI_DBSET', {}), 'BUDGET': 'lots'};"
        "settings.configure(**values);"
        "django.setup()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    # AppConfig.ready refuses to start with a serious misconfiguration.
    assert result.returncode != 0
    assert "asgi_dbset.E006" in result.stderr


def test_the_middleware_refuses_bad_settings_at_startup() -> None:
    with override_settings(ASGI_DBSET={"DEFAULT_PARALLELISM": 0}):
        with pytest.raises(ImproperlyConfigured, match=r"asgi_dbset\.E003"):
            DBSetMiddleware(lambda scope, receive, send: None)  # type: ignore[arg-type, return-value]


def test_the_middleware_refuses_what_is_no_asgi_app() -> None:
    from django.core.asgi import get_asgi_application

    # Accepted before, then every request failed (the lifespan let it through).
    with pytest.raises(TypeError, match=r"get_asgi_application\(\)\) - with"):
        DBSetMiddleware(get_asgi_application)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ASGI application"):
        DBSetMiddleware(None)  # type: ignore[arg-type]


def test_transaction_pooled_aliases() -> None:
    pooled = {"TRANSACTION_POOLED": ["default"]}
    ready = databases(DISABLE_SERVER_SIDE_CURSORS=True)
    assert ids(DATABASES=ready, ASGI_DBSET=pooled) == []
    # Not a list of aliases, or an alias that does not exist.
    assert ids(ASGI_DBSET={"TRANSACTION_POOLED": "default"}) == ["asgi_dbset.E014"]
    assert ids(ASGI_DBSET={"TRANSACTION_POOLED": ["nope"]}) == ["asgi_dbset.E014"]
    # PgBouncer pools PostgreSQL only: E015's hint (server-side cursors) would
    # send the user after the wrong setting.
    legacy = databases()
    legacy["legacy"] = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}
    assert ids(DATABASES=legacy, ASGI_DBSET={"TRANSACTION_POOLED": ["legacy"]}) == [
        "asgi_dbset.E014",
        "asgi_dbset.W002",  # (its calls run one at a time: another message)
    ]
    # Server-side cursors cannot outlive a transaction there.
    cursors = databases(DISABLE_SERVER_SIDE_CURSORS=False)
    assert ids(DATABASES=cursors, ASGI_DBSET=pooled) == ["asgi_dbset.E015"]
    # Prepared statements do not follow a client from session to session.
    binding = copy.deepcopy(ready)
    binding["default"]["OPTIONS"]["server_side_binding"] = True
    binding["default"]["OPTIONS"].pop("prepare_threshold", None)
    assert ids(DATABASES=binding, ASGI_DBSET=pooled) == ["asgi_dbset.E016"]
    binding["default"]["OPTIONS"]["prepare_threshold"] = None
    assert ids(DATABASES=binding, ASGI_DBSET=pooled) == []


def test_the_transaction_pooled_checks_say_what_to_write() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Overriding setting DATABASES", UserWarning)
        with override_settings(
            DATABASES=databases(DISABLE_SERVER_SIDE_CURSORS=False),
            ASGI_DBSET={"TRANSACTION_POOLED": ["default"]},
        ):
            (message,) = check_settings()
    assert message.id == "asgi_dbset.E015"
    assert "DATABASES['default'][\"DISABLE_SERVER_SIDE_CURSORS\"] = True" in str(
        message.hint
    )


def test_an_alias_without_autocommit() -> None:
    # Its writes on extra lanes would sit in the lanes' own transactions, which
    # the request's transaction.commit() never commits: refused at startup
    # (tests/test_autocommit_off.py shows what it would lose).
    assert ids(DATABASES=databases(AUTOCOMMIT=False)) == ["asgi_dbset.E018"]
    # At parallelism 1 every call runs on the request's connection, as stock.
    one = {"MAX_PARALLELISM": 1, "DEFAULT_PARALLELISM": 1}
    assert ids(DATABASES=databases(AUTOCOMMIT=False), ASGI_DBSET=one) == []


def _reset_nothing(conn: psycopg.Connection[Any]) -> None:
    """A pool ``reset`` callback (psycopg_pool calls it as a connection comes back)."""


# Pool options as users write them, each either refused by the checks or
# taken by Django's backend at the first query; the test below finds which.
POOL_OPTIONS_AT_THE_FIRST_QUERY = [
    {"min_size": 0, "max_size": 4},
    {
        "min_size": 1,
        "max_size": 4,
        "timeout": 5,
        "max_waiting": 10,
        "max_lifetime": 60,
        "max_idle": 30.5,
        "reconnect_timeout": 10,
        "num_workers": 1,
        "name": "e017",
        "reset": _reset_nothing,
        "close_returns": False,
        "connection_class": psycopg.Connection,
    },
    {"check": ConnectionPool.check_connection},  # Django 6.1 takes it, 5.2 does not
    {"configure": _reset_nothing},
    {"kwargs": {"application_name": "x"}},
    {"open": True},
    {"max_sise": 8},
    {"num_workers": 0},
    {"timeout": "5"},
    {"max_lifetime": None},
]


# A small pool that never waits long, under each case's options.
PROBE_POOL = {"min_size": 0, "max_size": 2, "timeout": 2}


def _first_query(pool: dict[str, Any]) -> str | None:
    """Make a pool with *pool* options as Django's backend does at a
    database's first query, and run it; None if it worked, else the error."""
    settings_dict = copy.deepcopy(connections["default"].settings_dict)
    # (A pool of its own, made and dropped here.)
    settings_dict["OPTIONS"]["pool"] = {**PROBE_POOL, **pool}
    wrapper = DatabaseWrapper(settings_dict, alias="e017_probe")
    try:
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        made = DatabaseWrapper._connection_pools.pop("e017_probe", None)
        if made is not None:
            if wrapper.connection is not None:
                made.putconn(wrapper.connection)
                wrapper.connection = None
            made.close(timeout=1.0)
    return None


@pytest.mark.django_db
@pytest.mark.parametrize("pool", POOL_OPTIONS_AT_THE_FIRST_QUERY, ids=repr)
def test_pool_options_are_refused_at_startup_exactly_when_djangos_first_query_fails(
    pool: dict[str, Any],
) -> None:
    # Stock Django makes the pool (and refuses its options) at the first
    # query; the checks must refuse at startup what fails there, and nothing
    # else.
    failure = _first_query(pool)
    found = ids(DATABASES=databases(pool={**PROBE_POOL, **pool}))
    # (Valid options may get a warning: max_waiting gets W006.)
    assert ("asgi_dbset.E017" in found) == (failure is not None), (found, failure)


def test_a_pool_argument_django_passes_itself_says_what_to_write() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Overriding setting", UserWarning)
        with override_settings(DATABASES=databases(pool={"configure": print})):
            (message,) = check_settings()
    assert "'configure', which Django passes to the pool itself" in message.msg
    assert '["options"] = "-c name=value"' in str(message.hint)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Overriding setting", UserWarning)
        with override_settings(DATABASES=databases(pool={"max_sise": 8})):
            (message,) = check_settings()
    assert message.hint == "Did you mean 'max_size'?"


def test_a_pool_with_max_waiting_is_a_warning() -> None:
    waiting = databases(pool={"min_size": 2, "max_size": 8, "max_waiting": 5})
    assert ids(DATABASES=waiting) == ["asgi_dbset.W006"]
    assert ids(DATABASES=waiting, ASGI_DBSET={"MAX_PARALLELISM": 1}) == []
    unbounded = databases(pool={"min_size": 2, "max_size": 8, "max_waiting": 0})
    assert ids(DATABASES=unbounded) == []
