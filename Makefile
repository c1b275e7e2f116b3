# One-command setup, tests and demo. Everything runs inside .venv/ at the repository root.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# JIT-compiled DeepSpeed ops (cpu_adam) are built once per environment, next to it
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: install test test-fast test-launch test-gpu gpu-check demo bench lint docs clean

install: $(STAMP)

$(STAMP): setup.py requirements/*.txt tools/install_env.sh
	bash tools/install_env.sh $(VENV)
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not launchers" tests

test-launch: $(STAMP)
	$(PY) -m pytest -q tests/launch

# The GPU suite (tests/gpu, never part of `make test`) and the GPU check. Neither installs
# anything: they use the .venv python when there is one, else the machine's python3 (on a GPU
# machine without network: `source tools/gpu_env.sh` first, see docs/gpu.md).
GPU_PY ?= $(shell [ -x $(PY) ] && echo $(PY) || echo python3)

test-gpu:
	$(GPU_PY) tests/gpu/run.py

# make test-gpu, then the short GPU benchmark, then one summary table (docs/gpu.md)
gpu-check:
	GPU_PY=$(GPU_PY) bash tools/gpu_check.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .

docs: $(STAMP)
	$(PY) -m megatron.neox_arguments.docs > configs/README.md

demo: $(STAMP)
	@test -f data/pydocs/pydocs_text_document.idx || $(PY) prepare_data.py pydocs
	rm -rf runs/demo
	$(PY) deepy.py train.py configs/demo.yml
	$(PY) tools/summarize_run.py runs/demo/logs --save runs/demo/checkpoints
	$(PY) deepy.py generate.py configs/demo.yml configs/text_generation.yml --num_gpus 1 \
		--text_gen_type input-file --sample_input_file configs/demo_prompts.txt \
		--sample_output_file runs/demo/samples.jsonl --maximum_tokens 48 --temperature 0.7

# Benchmarks: data layer, training throughput (trainer vs bare PyTorch loop, interleaved),
# data-parallel scaling, ZeRO memory, checkpoints; regenerates the table in bench/README.md.
# make bench BENCH_FLAGS=--quick  for a shorter run.
BENCH_FLAGS ?=
bench: $(STAMP)
	@test -f data/pydocs/pydocs_text_document.idx || $(PY) prepare_data.py pydocs
	$(PY) bench/bench_data.py $(BENCH_FLAGS)
	$(PY) bench/bench_train.py $(BENCH_FLAGS)
	$(PY) bench/bench_checkpoint.py $(BENCH_FLAGS)
	$(PY) bench/step_profile.py $(BENCH_FLAGS)
	$(PY) bench/report.py

clean:
	rm -rf $(VENV) build *.egg-info
