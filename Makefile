# omni-finetune: make install | make finetune RECIPE=x | make eval RECIPE=x | make export RECIPE=x | make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= medical-tiny
ARGS ?=
# torch is installed first and pinned so that pip keeps it (the CPU wheel on CPU-only machines);
# override with e.g. `make install TORCH="torch==2.9.1"`.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,medical

.PHONY: install finetune train eval export check test demo recipes clean bench-packing

install:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@$(PY) -c "import torch, transformers, peft, trl; print(f'installed: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}')"

# train, evaluate (base vs tuned) and export; prints where every result is
finetune:
	$(PY) -m finetune run $(RECIPE) $(ARGS)

train:
	$(PY) -m finetune train $(RECIPE) $(ARGS)

eval:
	$(PY) -m finetune eval $(RECIPE) $(ARGS)

export:
	$(PY) -m finetune export $(RECIPE) $(ARGS) --force

check:
	$(PY) -m finetune data check --recipe $(RECIPE) $(FILES)

demo:
	$(PY) -m finetune demo medical

recipes:
	$(PY) -m finetune recipes

test:
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf runs data/demo

bench-packing:
	$(PY) bench/packing.py
