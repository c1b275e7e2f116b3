# One-command setup, tests and demo. Everything runs inside .venv/ at the repository root.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: install test test-fast demo bench lint docs clean

install: $(STAMP)

$(STAMP): setup.py requirements/*.txt tools/install_env.sh
	bash tools/install_env.sh $(VENV)
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

docs: $(STAMP)
	$(PY) -m megatron.neox_arguments.docs > configs/README.md

demo: $(STAMP)
	$(PY) deepy.py --dry-run train.py configs/demo.yml

clean:
	rm -rf $(VENV) build *.egg-info
