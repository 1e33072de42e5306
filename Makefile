# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv on first use and install what they need into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.shardface-installed

.PHONY: demo test lint bench bench-gpu install clean

install: $(STAMP)

# A torch already importable (e.g. a CUDA build on a GPU machine) is kept via
# --system-site-packages; otherwise the CPU build is installed, because an unpinned
# torch would pull gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/shardface demo

# Lint (ruff: style, bugs, import order) and types (mypy), then the tests; see docs/architecture.md.
test: lint
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) bench/partial_fc_bench.py
	$(PY) bench/data_bench.py
	$(PY) bench/train_bench.py

# One GPU, under 8 minutes: writes the GPU section of bench/RESULTS.md (needs a CUDA torch).
bench-gpu: $(STAMP)
	$(PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) runs
