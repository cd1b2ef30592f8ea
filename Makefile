# Set-up and entry points. Each target creates .venv on first use (Python >= 3.10 and git only).
#   make demo                 the main job: the SteerLM pipeline on the embedded default (synthetic world →
#                             base LM → APM → annotation → SFT and plain SFT → bootstrap → steering
#                             evaluation → runs/pipeline/report.md); rerun to resume after a kill
#   make smoke                a tiny Llama trained on the bundled text in seconds (recipes/demo.py)
#   make test                 ruff (lint + format check), mypy and the whole test suite (what CI runs via .ci/run)
# TORCH_SPEC picks the torch build: the default pins the release the CPU CI machines carry; on a GPU
# workstation use e.g. `make test TORCH_SPEC=torch` (or an existing CUDA build).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist workers; --dist loadfile keeps each test file (and its module fixtures) on one worker, and
# --no-loadscope-reorder hands the files out in tests/conftest.py's LONGEST_FIRST order
PYTEST_WORKERS ?= 2
STAMP := $(VENV)/.steerlm-installed

.PHONY: demo smoke test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/python recipes/pipeline.py $(ARGS)

smoke: $(STAMP)
	$(VENV)/bin/python recipes/demo.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs data .pytest_cache
