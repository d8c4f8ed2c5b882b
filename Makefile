# vitdeep: `make demo` runs the main job on built-in data, `make test` runs the test suite (`make
# test-fast` the tests that start no other process),
# `make bench` prints the benchmark tables, `make gpu-check` runs the prepared GPU check (≤ 5 min on
# one CUDA GPU; results in benchmarks/results/gpu-<card>.*). Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready
# DeepSpeed picks the CPU accelerator on machines without a GPU.
export DS_ACCELERATOR ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
# The suite runs on two pytest-xdist workers, one test file each at a time (`--dist loadfile`, so a
# file's shared multi-rank launch runs once); TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup demo test test-fast bench gpu-check clean

setup: $(READY)

$(READY): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,demo]'
	touch $@

demo: $(READY)
	$(VENV)/bin/vitdeep demo --out runs/demo

test: $(READY)
	$(PYTEST)

# The inner loop: every test that starts no other vitdeep process (tests/conftest.py enforces the mark).
test-fast: $(READY)
	$(PYTEST) -m "not slow"

bench: $(READY)
	$(PY) benchmarks/run_all.py

gpu-check: $(READY)
	PYTHON=$(PY) bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) runs build *.egg-info
