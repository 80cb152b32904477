# Two commands from a fresh machine: `make demo` and `make test`. Each installs what it needs
# once per machine (scripts/install_deps.sh: keeps an existing torch).
PYTHON ?= python3
NPROC ?= 2
export PYTHONWARNINGS ?= ignore::FutureWarning,ignore::UserWarning

.PHONY: install install-test demo test test-fast bench clean

install:
	PYTHON=$(PYTHON) bash scripts/install_deps.sh demo

install-test:
	PYTHON=$(PYTHON) bash scripts/install_deps.sh test

# Tiny Llama-3 on CPU, 2 processes: 20 steps data-parallel, checkpoint, then resume the same run
# resharded to tensor parallel for the last 20 steps.
demo: install
	$(PYTHON) tools/make_demo_data.py --output-dir demo/data
	rm -rf demo/checkpoints demo/tensorboard
	$(PYTHON) -m torch.distributed.run --nproc-per-node $(NPROC) pretrain_prolong.py \
		--config examples/demo_cpu.yaml train.exit_at_step=20
	$(PYTHON) -m torch.distributed.run --nproc-per-node $(NPROC) pretrain_prolong.py \
		--config examples/demo_cpu.yaml parallel.tensor=2

test: install-test
	$(PYTHON) -m pytest -q

# Unit tests only (seconds): no multi-process runs.
test-fast: install-test
	$(PYTHON) -m pytest -q -m "not distributed" tests/test_config.py tests/models tests/training tests/data

# Figures, not pass/fail: conversion and loader throughput, attention TFLOP/s, conversion memory.
bench: install-test
	$(PYTHON) benchmarks/bench_data.py
	$(PYTHON) benchmarks/bench_attention.py
	$(PYTHON) benchmarks/bench_convert.py

clean:
	rm -rf demo runs .pytest_cache
