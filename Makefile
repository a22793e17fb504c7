# One command sets up a virtual environment from the project's own files and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Minimum-versions environment: every dependency of pyproject.toml at its declared floor (.ci/min_constraints.py).
MIN_VENV ?= .venv-min
MIN_PY := $(MIN_VENV)/bin/python
MIN_STAMP := $(MIN_VENV)/.installed
# CI tools kept out of the audited environments.
TOOLS_VENV ?= .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed
PIP_AUDIT_VERSION := 2.10.1

.PHONY: install test test-fast test-min lint audit ci demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,examples]"
	touch $(STAMP)

$(MIN_STAMP): pyproject.toml .ci/min_constraints.py
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install --quiet --upgrade pip
	$(MIN_PY) .ci/min_constraints.py test examples > $(MIN_VENV)/constraints.txt
	$(MIN_PY) -m pip install --quiet -c $(MIN_VENV)/constraints.txt -e ".[test,examples]"
	touch $(MIN_STAMP)

$(TOOLS_STAMP):
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet pip-audit==$(PIP_AUDIT_VERSION)
	touch $(TOOLS_STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not ddp"

# The fast suite with every dependency at its declared floor.
test-min: $(MIN_STAMP)
	$(MIN_PY) -m pytest -q -p no:cacheprovider -m "not slow and not ddp"

# ruff is pinned in the `test` extra.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

audit: $(STAMP) $(MIN_STAMP) $(TOOLS_STAMP)
	PIP_AUDIT=$(TOOLS_VENV)/bin/pip-audit .ci/audit $(PY) $(MIN_PY)

# What CI runs (.ci/run).
ci: lint test test-min audit

# A few minutes on CPU: ESRGAN + SeD on the photos scikit-image ships; outputs in runs/demo.
# Again into the same folder: make demo ARGS=--overwrite (start over) or ARGS=--resume (continue).
demo: $(STAMP)
	$(PY) examples/retrofit_esrgan.py --preset demo $(ARGS)

clean:
	rm -rf $(VENV) $(MIN_VENV) $(TOOLS_VENV) .pytest_cache build dist *.egg-info
