# The README's two commands: `make demo` and `make test`. Each installs what it needs first.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install demo test lint bench

install:
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"

demo: install
	$(PYTHON) pretrain_longctx.py

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest

bench: install
	$(PYTHON) benchmarks/attention_scaling.py
