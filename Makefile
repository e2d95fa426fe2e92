# Developer entry points. `make test` is the suite command the README and .ci/run use.
#
# The virtualenv is made from /usr/bin/python3 on purpose: PostgreSQL's archive_command runs
# `drkit wal-push` as the postgres user, so the interpreter must be one every user can run.

PYTHON_SYSTEM ?= /usr/bin/python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
PYTEST_ARGS   ?= -n 2

.PHONY: venv test lint imports demo deps-demo deps-test

venv:
	$(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install -e '.[test]'

# The layer contract (about a second) runs first, so CI checks it too. pytest exits 5 when it
# collected no tests; a suite that silently ran nothing is a failure.
test: deps-test
	@test -x $(PY) || $(MAKE) venv
	@$(MAKE) --no-print-directory imports
	@$(PY) -m pytest $(PYTEST_ARGS) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

lint: imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The import contract of docs/design.md's layers ([tool.importlinter] in pyproject.toml).
imports:
	@test -x $(VENV)/bin/lint-imports || { echo "make imports: import-linter is missing; run 'make venv'" >&2; exit 2; }
	$(VENV)/bin/lint-imports

demo: deps-demo
	@test -x $(PY) || $(MAKE) venv
	$(PY) scripts/demo.py

# What demo and test need on Debian 12, the step .ci/run takes too: as root it installs what is
# missing (nothing is downloaded again); as another user it says what to install and stops.
deps-demo:
	@scripts/install_deps.sh demo

deps-test:
	@scripts/install_deps.sh test
