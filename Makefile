# Set-up and entry points. Each target creates .venv on first use (Python >= 3.10 and git only).
#   make demo                 the main job: a tiny Llama trained on the bundled text (CPU or GPU)
#   make test                 the whole test suite (what CI runs via .ci/run)
# TORCH_SPEC picks the torch build: the default pins the release the CPU CI machines carry; on a GPU
# workstation use e.g. `make test TORCH_SPEC=torch` (or an existing CUDA build).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=
STAMP := $(VENV)/.steerlm-installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/python recipes/demo.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
