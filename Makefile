# asgi_dbset: `make demo` serves the example shop, `make test` runs the whole suite.
#
#   make demo                        .venv, migrations, seed data, uvicorn on :8000
#   make test                        ruff, mypy, then pytest in every Django x Python cell
#   make test PYTEST_ARGS="-k smoke" extra pytest arguments, passed to every cell
#   make test CELLS=A                only some cells (A: Django 5.2/Py3.11,
#                                    B: Django 6.1/Py3.12, C: Django 6.1/Py3.13,
#                                    D: Django 5.2/Py3.11 with the lowest asgiref,
#                                    E: Django 5.2/Py3.11 through PgBouncer,
#                                    F: Django 6.0/Py3.12)
#   make test-embedded               smoke tests on the embedded server, main cell
#   make db-start, make db-stop      start/stop the embedded PostgreSQL (.pgdata/)
#   make chromium                    install Debian's chromium if absent (browser test)
#   make pgbouncer                   install Debian's pgbouncer if absent (cell E)
#   make docs                        build the documentation (mkdocs --strict) into site/
#   make bench                       benchmarks (~36 min) -> bench/results/, docs/benchmarks.md
#   make bench BENCH_ARGS=--quick    a ~2 min benchmark smoke run, written under bench/.work/
#   make soak                        the soak tests (-m soak, ~20 min), main cell, figures shown
#
# The server: ASGI_DBSET_TEST_DSN (tests) or DATABASE_URL; without them an embedded
# PostgreSQL is started in .pgdata/ and left running for the next run.

SHELL := /bin/bash
PYTHON ?= python3
PYTEST_ARGS ?=
CELLS ?= A,B,C,D,E,F
HOST ?= 127.0.0.1
PORT ?= 8000
BENCH_ARGS ?=

VENV := .venv
VPY := $(VENV)/bin/python
MATRIX := $(PYTHON) scripts/matrix.py --python $(PYTHON)

.DEFAULT_GOAL := help
.PHONY: help venv demo lint typecheck test test-embedded db-start db-stop chromium pgbouncer docs bench soak

help:
	@sed -n '1,20p' Makefile | sed 's/^# \{0,1\}//'

venv:
	@$(MATRIX) venv A

demo: venv
	$(VPY) -m example_site migrate --noinput
	$(VPY) -m example_site seed_shop
	@echo "Serving the example shop on http://$(HOST):$(PORT)/ (Ctrl-C stops it)"
	$(VENV)/bin/uvicorn example_site.asgi:application --host $(HOST) --port $(PORT)

lint: venv
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

typecheck: venv
	$(VPY) -m mypy --strict asgi_dbset

# Every step runs even when an earlier one fails, so one run shows everything.
test: venv
	@failed=""; \
	$(MAKE) --no-print-directory lint || failed="$$failed lint"; \
	$(MAKE) --no-print-directory db-start || failed="$$failed db-start"; \
	$(MAKE) --no-print-directory typecheck || failed="$$failed typecheck"; \
	$(MAKE) --no-print-directory chromium || failed="$$failed chromium"; \
	$(MAKE) --no-print-directory pgbouncer || failed="$$failed pgbouncer"; \
	$(MAKE) --no-print-directory docs || failed="$$failed docs"; \
	$(MATRIX) test --cells $(CELLS) -- $(PYTEST_ARGS) || failed="$$failed pytest"; \
	if [ -n "$$failed" ]; then echo "make test FAILED:$$failed"; exit 1; fi; \
	echo "make test passed: lint, typecheck, docs, pytest"

# The embedded server is started from .venv before any cell runs: the embedded
# smoke tests use it in every cell, and pgserver cannot be installed on Python 3.13.
db-start: venv
	@env -u DATABASE_URL $(VPY) -m example_site.dbserver

test-embedded: db-start
	env -u ASGI_DBSET_TEST_DSN -u DATABASE_URL \
		$(MATRIX) test --cells A -- -m embedded $(PYTEST_ARGS)

db-stop: venv
	$(VPY) -c 'from example_site.dbserver import stop_embedded_server; stop_embedded_server()'

# tests/example/test_timeline_chromium.py loads the example in headless Chromium.
chromium:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "Installing Debian's chromium for the example's browser test."; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "chromium is missing; install it: sudo apt-get update && sudo apt-get install -y chromium"; \
		exit 1; \
	fi

# Cell E runs the suite through a real PgBouncer (tests/pgbouncer.py starts it).
pgbouncer:
	@if command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "Installing Debian's pgbouncer for the PgBouncer cell."; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; \
		systemctl disable --now pgbouncer >/dev/null 2>&1 || true; \
	else \
		echo "pgbouncer is missing; install it: sudo apt-get update && sudo apt-get install -y pgbouncer"; \
		exit 1; \
	fi

# The documentation, in strict mode: a broken link or anchor fails the build.
docs: venv
	@$(VPY) -c 'import mkdocs' 2>/dev/null || $(VPY) -m pip install --quiet -e '.[docs]'
	$(VPY) -m mkdocs build --strict --quiet

# Benchmarks (bench/, docs/benchmarks.md): never part of `make test`. bench/setup_env.py
# makes bench/.work/venv (this Python, Django 5.2) and bench/.work/venv-dab (Python 3.12,
# Django 6.1, django-async-backend) and installs wrk from Debian's packages if missing.
# The server: BENCH_DSN (default postgresql://postgres@127.0.0.1:5432/postgres); the
# harness creates and seeds its own database there, BENCH_DB (bench_asgi_dbset).
bench:
	@py="$$($(PYTHON) bench/setup_env.py | tail -n 1)" && "$$py" -m bench $(BENCH_ARGS)

# Soak tests (tests/reliability/, docs/reliability.md): never part of `make test`.
# REL_FIGURES=path.jsonl also writes each scenario's figures there.
soak: venv
	$(MATRIX) test --cells A -- -m soak -s $(PYTEST_ARGS)
