# Developer entry points. `make test` is the suite command the README and .ci/run use.
#
# The virtualenv is made from /usr/bin/python3 on purpose: PostgreSQL's archive_command runs
# `drkit wal-push` as the postgres user, so the interpreter must be one every user can run.

PYTHON_SYSTEM ?= /usr/bin/python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
PYTEST_ARGS   ?= -n 2

.PHONY: venv test lint demo

venv:
	$(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install -e '.[test]'

# pytest exits 5 when it collected no tests; a suite that silently ran nothing is a failure.
test:
	@$(PY) -m pytest $(PYTEST_ARGS) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

demo:
	@test -x $(PY) || $(MAKE) venv
	$(PY) scripts/demo.py
