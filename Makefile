# The two commands of the README. Everything installs into ./.venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: quickstart test lint install clean

## Install everything (builds mmcv 2.1.0 once), then train, test, export and
## plot one ATSS+DyHead detector on the built-in synthetic data.
quickstart: install
	$(PY) scripts/quickstart.py

## Install if needed, then run the test suite.
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

## Lint (ruff check: flake8 + isort rules) and format check (ruff format), as CI runs them.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

install:
	VENV=$(VENV) bash scripts/install.sh

clean:
	rm -rf build dist *.egg-info outputs work_dirs .pytest_cache
