# The two commands of the README, and the checks CI runs.
PY ?= python3
CORES ?= 2

.PHONY: setup study test lint smoke check ecosystem

# `pip install isae` alone measures SAEs; the workflow and the vision source are extras.
setup:  ## install the package with every extra the study and the tests need (torch pinned: CPU build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[workflow,vision,dev,slurm,cpu-kernels]'

study: setup  ## every figure and table of the embedded default
	snakemake --cores $(CORES) --workflow-profile workflow/profiles/local

test: setup  ## the test suite (CPU)
	$(PY) -m pytest -q

# A second environment beside the current sae-lens and eai-sparsify (which pin
# transformer-lens < 4): round trips through the real libraries, extraction and fidelity
# under transformer-lens 3.x. torch first, so that no CUDA build is pulled.
VENV ?= .venv-saelens
ecosystem:  ## build $(VENV) with sae-lens + eai-sparsify and run the tests marked ecosystem
	$(PY) -m venv --clear $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[workflow,vision]' sae-lens eai-sparsify pytest
	$(VENV)/bin/pip check
	$(VENV)/bin/python -c "from importlib.metadata import version as v; print(*(f'{p} {v(p)}' for p in ('sae-lens', 'eai-sparsify', 'transformer-lens', 'torch')), sep=', ')"
	$(VENV)/bin/python -m pytest -q -m ecosystem

lint:
	ruff check src tests scripts benchmarks
	snakemake --lint

check: test lint
