# Everything a fresh machine needs, from the project's own files.
# `make demo` runs the main job with the embedded defaults; `make test` runs the whole suite.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel of this torch is cached on CI machines; an unpinned torch pulls CUDA
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install demo test lint bench-deps
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/elmforest demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# what the benchmarks compare against: Hugging Face Trainer (accelerate) and mergekit
bench-deps: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
