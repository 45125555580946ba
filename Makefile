# The README's two commands: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install demo test bench

install:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"

demo: install
	PYTHON=$(PYTHON) bash examples/pretrain_tiny_cpu.sh

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest

bench: install
	$(PYTHON) benchmarks/attention_scaling.py
	$(PYTHON) benchmarks/document_window_cut.py
	$(PYTHON) benchmarks/tp_overhead.py
	$(PYTHON) benchmarks/pipeline_bubble.py
	$(PYTHON) benchmarks/preprocess_throughput.py
