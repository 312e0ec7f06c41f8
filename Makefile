# The two commands of the README. Everything installs into ./.venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: quickstart test install clean

## Install everything (builds mmcv 2.1.0 once), then train ATSS vs ATSS+DyHead on synthetic data.
quickstart: install
	$(PY) tools/quickstart.py

## Install if needed, then run the test suite.
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

install:
	VENV=$(VENV) bash scripts/install.sh

clean:
	rm -rf build dist *.egg-info outputs work_dirs .pytest_cache
