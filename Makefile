# Two entry points for a fresh machine: `make bench` (the main job) and `make test`.
# CI (.ci/run) adds `make guard`, `make docs` and `make wheel-smoke`.
VENV ?= .venv
PY := $(VENV)/bin/python

# torch is pinned and installed first: its CPU wheel then satisfies the project's
# `torch>=` requirement, so no install step pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,bench,peers,docs]"
	touch $@

# Examples per property for `make fuzz` (the suite's default is 40).
EXAMPLES ?= 2000

.PHONY: bench test fuzz demo lint compare guard docs wheel-smoke
bench: $(VENV)/.installed
	$(PY) -m bench sweep --quick

# This tree against another revision, timed alternately: make compare BASE=v0.1.0
compare: $(VENV)/.installed
	$(if $(BASE),,$(error make compare BASE=<revision>: the commit, tag or branch to compare with))
	$(PY) -m bench compare --base $(BASE)

# The speed guard: this tree against bench/baseline.txt's commit; fails on a slowdown.
guard: $(VENV)/.installed
	$(PY) -m bench compare --guard

test: $(VENV)/.installed
	$(PY) -m pytest

# The property tests with many more examples: hypothesis draws shapes, w from
# 1e-12 to 1e6 (1e300 in float64), queries placed far from the keys, and shrinks
# any failure to a minimal case it prints.
fuzz: $(VENV)/.installed
	NWFAST_EXAMPLES=$(EXAMPLES) $(PY) -m pytest tests/test_properties.py -q

demo: $(VENV)/.installed
	$(VENV)/bin/nwfast demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The documentation site into site/; strict: a broken link or reference fails the build
# (not with --quiet, which hides the warnings that strict mode counts).
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# nwfast as a user receives it: the wheel and the sdist built into dist/, the wheel
# installed (not editable) in a fresh environment beside torch==2.13.0 (pinned in the
# same install, so nothing swaps it for a CUDA build), used from outside the source tree.
SMOKE_VENV ?= build/smoke-venv
wheel-smoke: $(VENV)/.installed
	rm -rf dist $(SMOKE_VENV) && mkdir -p build
	$(PY) -m build --outdir dist . > build/wheel.log 2>&1 || (cat build/wheel.log; exit 1)
	python3 -m venv $(SMOKE_VENV)
	$(SMOKE_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(SMOKE_VENV)/bin/python -m pip install --quiet torch==2.13.0 "$$(ls dist/nwfast-*.whl)[sklearn]"
	cd "$$(mktemp -d)" && $(CURDIR)/$(SMOKE_VENV)/bin/python -I $(CURDIR)/.ci/smoke.py $(CURDIR)/dist
