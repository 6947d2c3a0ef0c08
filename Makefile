# Three commands: `make test`, `make demo` and `make docs`. Each sets up its own .venv from pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export KERAS_BACKEND := jax
export JAX_PLATFORMS ?= cpu

.PHONY: test demo lint docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# The API reference and the rendered notebooks, warnings as errors, read afresh (-E: a stale environment
# reported objects moved between modules as duplicates); about 30 s, and `make test` builds it too.
docs: $(VENV)/.installed
	$(VENV)/bin/sphinx-build -E -W --keep-going -q -b html docs docs/_build/html

test: lint docs
	$(PY) -m pytest -q -n 2 --durations=10 tests
	$(PY) -m pytest -q -p no:randomly -n 2 --nbmake notebooks

demo: $(VENV)/.installed
	$(PY) experiments/optimizer_comparison/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache docs/_build docs/api docs/notebooks
