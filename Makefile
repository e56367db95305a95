# Two entry points for a fresh machine: `make bench` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

# torch is pinned and installed first: its CPU wheel then satisfies the project's
# `torch>=` requirement, so no install step pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,bench,peers]"
	touch $@

.PHONY: bench test demo lint
bench: $(VENV)/.installed
	$(PY) -m bench sweep --quick

test: $(VENV)/.installed
	$(PY) -m pytest

demo: $(VENV)/.installed
	$(VENV)/bin/nwfast demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
