# Two commands set up and run everything on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test demo lint format clean

# torch is installed first and pinned to 2.13.0 when absent: on the project's machines that
# takes the local CPU build instead of downloading a multi-GB CUDA wheel.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/boltzflow demo

lint: $(STAMP)
	$(VENV)/bin/ruff check boltzflow tests workflows
	$(VENV)/bin/ruff format --check boltzflow tests workflows

format: $(STAMP)
	$(VENV)/bin/ruff format boltzflow tests workflows
	$(VENV)/bin/ruff check --fix boltzflow tests workflows

clean:
	rm -rf $(VENV) build *.egg-info
