# r1jax: `make train RECIPE=r1_zero` and `make test` bootstrap .venv from setup.cfg on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPE ?= r1_zero
ARGS ?=

.PHONY: venv train eval test test-slow bench bench-sampler clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

train: $(STAMP)
	$(BIN)/python -m r1jax train --recipe $(RECIPE) $(ARGS)

eval: $(STAMP)
	$(BIN)/python -m r1jax eval --recipe $(RECIPE) $(ARGS)

# Tests are mostly compile-bound (one core each): two workers keep both cores of a laptop busy.
# loadfile keeps each file's module fixtures (a reference run) in one worker.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

bench: bench-sampler

bench-sampler: $(STAMP)
	$(BIN)/python -m r1jax.bench.sampler $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
