# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.ddpo --config=experiments/configs/ddpo/digits.py --workdir=runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=15 tests

clean:
	rm -rf $(VENV) runs
