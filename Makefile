# Two commands do all the set-up: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch first (it lies on this machine's disk); the project's torch range
	# then installs nothing more. Plain `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m ops.demo

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: setup lint
	$(VENV)/bin/pytest -m "not slow and not ray" $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.serving
	$(PY) -m bench.lora

clean:
	rm -rf var .pytest_cache .ruff_cache
