# The commands of the README: `make demo`, `make test` (lint, then the suite), `make lint`,
# `make format`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test lint format install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.ddpo --config=experiments/configs/ddpo/digits.py --workdir=runs/demo

lint: $(STAMP)
	$(VENV)/bin/pyink --check --diff --quiet .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/pyink --quiet .
	$(VENV)/bin/ruff check --fix --quiet .

test: lint
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=15 tests

clean:
	rm -rf $(VENV) runs
