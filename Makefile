# r1jax: `make train RECIPE=r1_zero` and `make test` bootstrap .venv from setup.cfg on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
RECIPE ?= r1_zero
ARGS ?=

.PHONY: venv train eval test test-slow bench bench-sampler bench-grpo bench-train bench-gpu clean

venv: $(STAMP)

# `make train` needs only the runtime dependencies; torch and transformers come with the test extra.
$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	@touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(TEST_STAMP)

BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	@touch $(BENCH_STAMP)

train: $(STAMP)
	$(BIN)/python -m r1jax train --recipe $(RECIPE) $(ARGS)

eval: $(STAMP)
	$(BIN)/python -m r1jax eval --recipe $(RECIPE) $(ARGS)

# Tests are mostly compile-bound (one core each): two workers keep both cores of a laptop busy.
# loadfile keeps each file's tests in one worker: its module fixtures (a reference run) are built once and its
# jitted programs compiled once (handing tests out one at a time compiled many twice: slower overall).
TEST_WORKERS ?= 2

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile tests

test-slow: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m slow tests

# Figures land in $(BENCH_OUT) as JSON beside the printed tables.
BENCH_OUT ?= runs/bench

# `make bench` runs them all and merges their figures into $(BENCH_OUT)/bench.json, by device kind.
bench: bench-grpo bench-sampler bench-train
	$(BIN)/python -m r1jax.bench.summary $(BENCH_OUT)

# One GRPO step against TRL's GRPOTrainer at both shapes (on CPU; TRL's side is skipped elsewhere).
bench-grpo: $(BENCH_STAMP)
	@mkdir -p $(BENCH_OUT)
	$(BIN)/python -m r1jax.bench.grpo_step --json $(BENCH_OUT)/grpo_step.json $(ARGS)
	$(BIN)/python -m r1jax.bench.grpo_step --shape smollm2-135m --microbatches 4 --steps 2 \
		--json $(BENCH_OUT)/grpo_step_smollm2-135m.json $(ARGS)

# The sampler at the smollm2-135m shape with top-p 0.95 (against transformers on CPU, one core each), the toy and
# qwen2.5-0.5b shapes, then long-tailed lengths (lockstep vs continuous batching) at the toy shape.
bench-sampler: $(BENCH_STAMP)
	@mkdir -p $(BENCH_OUT)
	$(BIN)/python -m r1jax.bench.sampler --preset smollm2-135m --prompts 8 -G 4 --prompt-len 64 --new-tokens 64 \
		--top-p 0.95 --repeats 2 --json $(BENCH_OUT)/sampler.json $(ARGS)
	$(BIN)/python -m r1jax.bench.sampler --preset toy --prompts 8 -G 8 --prompt-len 64 --new-tokens 128 \
		--top-p 0.95 --no-transformers --json $(BENCH_OUT)/sampler_toy.json $(ARGS)
	$(BIN)/python -m r1jax.bench.sampler --preset qwen2.5-0.5b --prompts 4 -G 4 --prompt-len 64 --new-tokens 32 \
		--top-p 0.95 --repeats 1 --no-transformers --json $(BENCH_OUT)/sampler_qwen2.5-0.5b.json $(ARGS)
	$(BIN)/python -m r1jax.bench.sampler --mix long-tail --preset toy --prompts 8 -G 8 --prompt-len 64 \
		--new-tokens 256 --slots 16 --json $(BENCH_OUT)/sampler_long_tail.json $(ARGS)

# Training-step MFU: the smollm2-135m shape with a 4k vocabulary on CPU (peak measured), fp32.
bench-train: $(BENCH_STAMP)
	@mkdir -p $(BENCH_OUT)
	$(BIN)/python -m r1jax.bench.train_step --preset smollm2-135m --vocab 4096 --batch 8 --seq 256 \
		--json $(BENCH_OUT)/mfu.json $(ARGS)

# The accelerator checks (bf16): decode at 32 prompts x 16 samples, 1k-token prompts, 4k new tokens, against the
# HBM roofline; training-step MFU at 4k tokens; a few R1-Zero steps logging the sampler/trainer log-prob gap and
# each step's split. Written for a lent GPU; not yet run on one. qwen2.5-1.5b's 32 x 16 rows hold 75 GB of KV cache
# at 5k slots (an H200); on an H100 it decodes 16 x 16.
GPU_1_5B_PROMPTS ?= 16
bench-gpu: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	$(BIN)/python -m r1jax.bench.sampler --preset qwen2.5-0.5b --prompts 32 -G 16 --prompt-len 1024 \
		--new-tokens 4096 --top-p 0.95 --repeats 1 --json $(BENCH_OUT)/sampler_gpu_qwen2.5-0.5b.json
	$(BIN)/python -m r1jax.bench.sampler --preset qwen2.5-1.5b --prompts $(GPU_1_5B_PROMPTS) -G 16 --prompt-len 1024 \
		--new-tokens 4096 --top-p 0.95 --repeats 1 --json $(BENCH_OUT)/sampler_gpu_qwen2.5-1.5b.json
	$(BIN)/python -m r1jax.bench.train_step --preset qwen2.5-0.5b --batch 8 --seq 4096 --remat full \
		--json $(BENCH_OUT)/mfu.json
	$(BIN)/python -m r1jax.bench.train_step --preset qwen2.5-1.5b --batch 4 --seq 4096 --remat full \
		--json $(BENCH_OUT)/mfu_qwen2.5-1.5b.json
	$(BIN)/python -m r1jax train --recipe r1_zero rl.steps=5 rl.recompute_old_logp=true eval.every=0 \
		run_dir=$(BENCH_OUT)/r1_zero_gpu
	$(BIN)/python -m r1jax.bench.summary $(BENCH_OUT)

clean:
	rm -rf $(VENV) build *.egg-info
