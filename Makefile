# evomerge: set-up, tests, benchmarks and the main job. Everything installs into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# On a CPU machine without a local CPU wheel, set TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast lint demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
ifneq ($(HAS_GPU),yes)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
endif
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m ruff check evomerge tests benchmarks
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site
	$(PY) -m pytest -q

# the quick loop while changing code: everything but the slow, cluster, PostgreSQL and
# real-model tests (`make test` runs them all, as CI does)
test-fast: setup
	$(PY) -m ruff check evomerge tests benchmarks
	$(PY) -m pytest -q -m "not slow and not cluster and not postgres and not real_model"

lint: setup
	$(PY) -m ruff check evomerge tests benchmarks

# The main job: the real zoo (SmolLM2-135M-Instruct from its PyPI wheel, its experts folded in
# from the shipped low-rank factors, cached), then the demo's PS, DFS and PS+DFS searches (each
# resumable: run `make demo` again after an interruption), the headline table, and for the
# PS+DFS run its status, exported Pareto set and report.
DEMO_RUNS ?= results/demo
demo: setup
	$(VENV)/bin/evomerge zoo real
	$(PY) benchmarks/demo_headline.py --runs $(DEMO_RUNS)
	$(VENV)/bin/evomerge status $(DEMO_RUNS)/ps_dfs
	$(VENV)/bin/evomerge export $(DEMO_RUNS)/ps_dfs --pareto --to $(DEMO_RUNS)/ps_dfs/exports --force --quiet
	$(VENV)/bin/evomerge report $(DEMO_RUNS)/ps_dfs
	@echo "table: $(DEMO_RUNS)/headline.md  report: $(DEMO_RUNS)/ps_dfs/report/index.html  models: $(DEMO_RUNS)/ps_dfs/exports"

bench: setup
	$(PY) benchmarks/merge_speed.py
	$(PY) benchmarks/turnaround.py
	$(PY) benchmarks/dispatch.py
	$(PY) benchmarks/map_digits.py
	$(PY) benchmarks/zoo_results.py
	$(PY) benchmarks/demo_headline.py
	$(PY) benchmarks/report_render.py
	$(PY) benchmarks/chaos.py
	$(PY) benchmarks/fuzz_inputs.py
	$(PY) benchmarks/m2n2_digits.py --hidden 8
	$(PY) benchmarks/m2n2_digits.py --hidden 256 --arms "m2n2,no crossover,no attraction,GA (alpha 0),Sep-CMA-ES"

clean:
	rm -rf $(VENV) results/example results/bench
