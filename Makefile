# The two commands of the README, and the checks CI runs.
PY ?= python3
CORES ?= 2

.PHONY: setup study test lint smoke check

setup:  ## install the package and everything it needs (torch pinned: CPU build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,slurm,cpu-kernels]'

study: setup  ## every figure and table of the embedded default
	snakemake --cores $(CORES) --workflow-profile workflow/profiles/local

test: setup  ## the test suite (CPU)
	$(PY) -m pytest -q

lint:
	ruff check src tests scripts benchmarks
	snakemake --lint

check: test lint
