# Two commands: `make test` and `make demo`. Each sets up its own .venv from pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export KERAS_BACKEND := jax
export JAX_PLATFORMS ?= cpu

.PHONY: test demo lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -n 2 --durations=10 tests
	$(PY) -m pytest -q -p no:randomly --nbmake notebooks

demo: $(VENV)/.installed
	$(PY) experiments/optimizer_comparison/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
