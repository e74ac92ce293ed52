# The two commands a new user needs are `make run` and `make test`; both create .venv themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo

.PHONY: setup run test test-fast bench lint clean

setup: $(STAMP)

# torch goes in first so nothing later resolves a CUDA build; deepspeed is built against it
# without build isolation. The stamp is re-made whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "setuptools>=68" wheel
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check --no-build-isolation deepspeed==0.19.8
	$(PIP) install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

run: setup
	$(PY) jobs/pipeline.py --workdir $(RUN_DIR) --config jobs/configs/pipeline-demo.yaml

# tests/unit (no Ray, MLflow server or subprocess; under 2 minutes), then tests/integration, then tests/e2e:
# the layout rules are in tests/support/layout.py. CI runs `make test`.
test: setup
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests/unit

bench: setup
	$(PY) bench/run.py --out bench/results.json

# ruff: the formatter's check and the lint rules of pyproject.toml ([tool.ruff])
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
