# Set-up commands for a fresh machine (see README):  make demo  |  make test
PYTHON ?= python3
VENV   ?= .venv
# torch==2.13.0 resolves to the CPU wheel on the project's machines; override for CUDA, e.g.
#   make test TORCH="torch==2.6.0"
TORCH  ?= torch==2.13.0
# the linter's version is pinned, so that a new ruff release cannot fail CI on unchanged code
RUFF   ?= ruff==0.17.6
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.seed_fast-installed
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: install demo test test-all lint info clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "setuptools>=64" wheel ninja

$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/seed-fast demo

test: install
	$(PY) -m seed_fast.info
	$(PY) -m pytest -q -m "not slow" tests

lint: $(PY)
	$(PY) -m pip install -q "$(RUFF)"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-all: install
	$(PY) -m pytest -q tests

info: install
	$(PY) -m seed_fast.info

clean:
	rm -rf $(VENV) build *.egg-info seed_fast/*.so
