# One command sets up a virtual environment from the project's own files and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,examples]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not ddp"

# A few minutes on CPU: ESRGAN + SeD on the photos scikit-image ships; outputs in runs/demo.
# Again into the same folder: make demo ARGS=--overwrite (start over) or ARGS=--resume (continue).
demo: $(STAMP)
	$(PY) examples/retrofit_esrgan.py --preset demo $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
