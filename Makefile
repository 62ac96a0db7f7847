# Two commands on a fresh machine (see README.md):
#   make train   set up .venv, then train the main job on the embedded default environment
#   make test    set up .venv, then run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/arena_ppo.py
WORKDIR ?= runs/$(basename $(notdir $(CONFIG)))
# Test processes (pytest-xdist): compiles are single-threaded, so two processes keep both
# cores of a CI machine busy; each test file stays in one process (module fixtures).
TEST_WORKERS ?= 2
# Avoids a jaxlib 0.10 CPU scheduler deadlock (BUILD.md, "Known traps").
export XLA_FLAGS ?= --xla_cpu_enable_concurrency_optimized_scheduler=false

.PHONY: setup train test bench clean

$(VENV)/.installed: setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[envs,video,dev,rlds]'
	touch $@

setup: $(VENV)/.installed

train: $(VENV)/.installed
	$(VENV)/bin/python -m experiments.train --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: $(VENV)/.installed
	$(VENV)/bin/python -m experiments.bench_ppo

clean:
	rm -rf $(VENV) runs .pytest_cache
