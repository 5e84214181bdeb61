# omni-finetune: make install | make finetune RECIPE=x [GPUS=n] | make eval RECIPE=x | make export RECIPE=x | make test
# dependencies: make install (the locked versions) | make install-latest && make test && make lock (refresh)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= medical-tiny
ARGS ?=
# torch is installed first and pinned so that pip keeps it (the CPU wheel on CPU-only machines);
# override with e.g. `make install TORCH="torch==2.9.1"`.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,medical,deepspeed
# several GPUs / nodes: `make finetune RECIPE=x GPUS=4` runs torchrun with 4 processes on this
# machine; multi-node: the same command on every node with NNODES, NODE_RANK, MASTER_ADDR and
# MASTER_PORT set (torchrun's standard variables). GPUS=1 and NNODES=1: one plain process.
GPUS ?= 1
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
ifeq ($(GPUS)$(NNODES),11)
LAUNCH := $(PY)
else
LAUNCH := $(VENV)/bin/torchrun --nproc_per_node $(GPUS) --nnodes $(NNODES) --node_rank $(NODE_RANK) \
	--master_addr $(MASTER_ADDR) --master_port $(MASTER_PORT)
endif

LOCK := requirements/lock.txt

.PHONY: install install-latest lock venv finetune train eval export check test demo recipes clean bench-packing gpu-check

# the exact versions the test suite last passed with (requirements/lock.txt, as pip constraints)
# DeepSpeed compiles none of its CUDA ops at install (DS_BUILD_OPS=0: no CUDA toolkit needed, no
# CUDA wheel taken); ZeRO with torch's optimizers needs none, and on the CPU it builds its small
# shared-memory op at first use (with ninja and the C++ compiler)
# timm (Gemma 3n's vision tower, the `gemma3n` extra) goes in without its dependencies: it requires
# torchvision, whose PyPI wheel is a CUDA build that breaks beside a CPU torch, and never calls it
# for MobileNetV5 (see finetune/families/gemma3n_timm.py); its other requirements are ours already
install: venv
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps -c $(LOCK) timm
	$(PY) tools/lock.py check

# the newest versions pyproject.toml allows; run `make test` on them, then `make lock` records them
install-latest: venv
	@# the torch already here is kept (an eager upgrade would fetch the newest build, a CUDA one)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	DS_BUILD_OPS=0 $(PY) -m pip install -q --upgrade --upgrade-strategy eager -c $(VENV)/torch-pin.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --upgrade --no-deps "timm>=1.0.16,<2"
	@$(PY) -c "import transformers, peft, trl; print(f'installed the newest allowed: transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}; now make test, then make lock')"

lock:
	$(PY) tools/lock.py write

venv:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"

# train, evaluate (base vs tuned) and export; prints where every result is
finetune:
	$(LAUNCH) -m finetune run $(RECIPE) $(ARGS)

train:
	$(LAUNCH) -m finetune train $(RECIPE) $(ARGS)

eval:
	$(PY) -m finetune eval $(RECIPE) $(ARGS)

# an existing export is replaced only with FORCE=1 (the old one stays until the new one is verified)
export:
	$(PY) -m finetune export $(RECIPE) $(ARGS) $(if $(FORCE),--force)

# the recipe's own data (or FILES=...), read as the recipe's model will read it
check:
	$(PY) -m finetune data check --recipe $(RECIPE) $(FILES) $(ARGS)

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

# every GPU check of the project, ~8 min on one H100/H200 (bench/gpu_check.py), results in
# bench/results/<date>-<gpu>.md. On a bare GPU machine carry .whl (bash tools/gpu_wheels.sh).
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	@if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
		--target /tmp/site .whl/*.whl; fi
	PYTHONPATH=/tmp/site$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) bench/gpu_check.py $(ARGS)
	@if [ -n "$$OUT" ]; then cp bench/results/*.md "$$OUT"/ 2>/dev/null || true; fi
