# The README's two commands: `make demo` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: setup demo test test-fast bench docs clean

setup: $(STAMP)

# pip (not uv/poetry): it takes torch 2.14.1 + torchvision 0.29.1 from the machine's local wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[convert,demo,dev]'
	$(PY) -m pip check
	touch $(STAMP)

# The shipped demo BadNet (data/demo_bd_net.h5) by default; `make demo DEMO_FLAGS=--rebuild` retrains it.
DEMO_FLAGS ?=
demo: $(STAMP)
	$(PY) -m bdpruning.cli demo --out runs/demo --cache data/generated/demo $(DEMO_FLAGS)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Each benchmark prints ratios measured side by side in one run (see README, Benchmarks).
bench: $(STAMP)
	$(PY) benchmarks/bench_compact.py
	$(PY) benchmarks/bench_convert.py
	$(PY) benchmarks/bench_sweep.py --images 2048
	$(PY) benchmarks/bench_speed.py

# The API reference, generated from the docstrings (pdoc), in docs/api/index.html.
docs: $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	PDOC_ALLOW_EXEC=1 $(PY) -m pdoc bdpruning -o docs/api

clean:
	rm -rf runs build *.egg-info .pytest_cache
