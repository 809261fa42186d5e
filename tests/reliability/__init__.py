"""Reliability proofs against a real server process and a real PostgreSQL.

A test starts ``uvicorn`` in a subprocess serving :mod:`tests.reliability.app`
(configured through ``REL_*`` environment variables, see
:mod:`tests.reliability.server_settings`), drives it from a separate client
process (:mod:`tests.reliability.client`), and watches the database itself
(``pg_stat_activity`` filtered by an ``application_name`` the test picks,
:mod:`tests.reliability.pgwatch`) and the server's pool and counters
(``/_rel/state``). Fast versions run in the default suite; larger ones are
marked ``soak``. See ``docs/reliability.md``.
"""
