# omni-finetune, on a fresh clone: make finetune RECIPE=x (sets .venv up on first use) | make test
# make eval RECIPE=x | make export RECIPE=x | make check RECIPE=x | make install (re-install, refresh the stamp)
# dependencies: make install-latest && make test && make lock (refresh the lock)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= medical-tiny
ARGS ?=
# torch is installed first and pinned so that pip keeps it (the CPU wheel on CPU-only machines);
# override with e.g. `make install TORCH="torch==2.9.1"`.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,medical,deepspeed,video
# the `serve` extra, installed apart (see install:): Gradio 6 and what it needs, pillow left out
GRADIO ?= gradio>=6,<7
SERVE_DEPS := "anyio>=3,<5" "audioop-lts<=0.2.2; python_version >= '3.13'" "brotli>=1.2.1" "fastapi>=0.115.2,<1" \
	"gradio-client>=2,<3" "groovy~=0.1" "hf-gradio>=0.4.1,<1" "httpx>=0.24.1,<1" "huggingface-hub>=1.16,<3" \
	"jinja2<4" "markupsafe>=2,<4" "numpy>=1,<3" "orjson~=3.0" packaging "pandas>=1,<4" "pydantic>=2,<=3" \
	"pydub<1" "python-multipart>=0.0.18,<1" "pytz>=2017.2" "pyyaml>=5,<7" "safehttpx>=0.1.7,<0.2" \
	"semantic-version~=2.0" "starlette>=1.0.1,<2" "tomlkit>=0.12,<0.15" "typer>=0.12,<1" "typing-extensions~=4.0" \
	"uvicorn>=0.14"
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
# Set-up on first use: every target that runs the toolkit depends on this stamp, named after the hash of
# the lock and pyproject.toml, so a fresh clone needs no `make install` first and a changed lock installs
# again. A .venv that already holds the locked versions (tools/lock.py check) is only stamped.
LOCK_HASH := $(shell cat $(LOCK) pyproject.toml 2>/dev/null | (sha256sum 2>/dev/null || shasum -a 256) | cut -c1-16)
STAMP ?= $(VENV)/.installed-$(LOCK_HASH)

.PHONY: install install-latest lock venv finetune train eval export check test test-all test-fast demo recipes clean bench-packing gpu-check

# the exact versions the test suite last passed with (requirements/lock.txt, as pip constraints)
# DeepSpeed compiles none of its CUDA ops at install (DS_BUILD_OPS=0: no CUDA toolkit needed, no
# CUDA wheel taken); ZeRO with torch's optimizers needs none, and on the CPU it builds its small
# shared-memory op at first use (with ninja and the C++ compiler)
# timm (Gemma 3n's vision tower, the `gemma3n` extra) goes in without its dependencies: it requires
# torchvision, whose PyPI wheel is a CUDA build that breaks beside a CPU torch, and never calls it
# for MobileNetV5 (see finetune/families/gemma3n_timm.py); its other requirements are ours already
# PyAV (the `video` extra) reads video files; its wheel bundles FFmpeg's CPU libraries, no CUDA
# Gradio (the `serve` extra: the page of `python -m finetune serve`) goes in without its dependencies
# too: gradio 6.31 (the locked one) caps pillow below 13, and our locked pillow 13 stays (the page hands
# Gradio file paths, never PIL images; tests/test_serve_page.py runs it on pillow 13). Its other requirements
# (SERVE_DEPS, from its wheel's Requires-Dist less pillow) install normally under the lock; pip then
# reports "gradio requires pillow<13", which is expected. tests/test_serve_page.py drives the page.
install: venv
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps -c $(LOCK) timm
	$(PY) -m pip install -q -c $(LOCK) $(SERVE_DEPS)
	$(PY) -m pip install -q --no-deps -c $(LOCK) "$(GRADIO)"
	$(PY) tools/lock.py check
	@rm -f $(VENV)/.installed-*$(if $(STAMP),; touch $(STAMP))

ifneq ($(STAMP),)
$(STAMP):
	@if test -x $(PY) && $(PY) -c "import torch" 2>/dev/null && $(PY) tools/lock.py check >/dev/null 2>&1; then \
		echo "$(VENV) holds the locked versions ($(LOCK))"; \
	else echo "setting up $(VENV) (first use, or $(LOCK) changed): make install"; $(MAKE) --no-print-directory install; fi
	@rm -f $(VENV)/.installed-*; touch $@
endif

# the newest versions pyproject.toml allows; run `make test` on them, then `make lock` records them
install-latest: venv
	@# the torch already here is kept (an eager upgrade would fetch the newest build, a CUDA one)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	DS_BUILD_OPS=0 $(PY) -m pip install -q --upgrade --upgrade-strategy eager -c $(VENV)/torch-pin.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --upgrade --no-deps "timm>=1.0.16,<2"
	$(PY) -m pip install -q --upgrade --upgrade-strategy eager -c $(VENV)/torch-pin.txt $(SERVE_DEPS)
	$(PY) -m pip install -q --upgrade --no-deps "$(GRADIO)"
	@$(PY) -c "import transformers, peft, trl; print(f'installed the newest allowed: transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}; now make test, then make lock')"

lock:
	$(PY) tools/lock.py write

venv:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"

# train, evaluate (base vs tuned) and export; prints where every result is
finetune: $(STAMP)
	$(LAUNCH) -m finetune run $(RECIPE) $(ARGS)

train: $(STAMP)
	$(LAUNCH) -m finetune train $(RECIPE) $(ARGS)

eval: $(STAMP)
	$(PY) -m finetune eval $(RECIPE) $(ARGS)

# an existing export is replaced only with FORCE=1 (the old one stays until the new one is verified)
export: $(STAMP)
	$(PY) -m finetune export $(RECIPE) $(ARGS) $(if $(FORCE),--force)

# the recipe's own data (or FILES=...), read as the recipe's model will read it
check: $(STAMP)
	$(PY) -m finetune data check --recipe $(RECIPE) $(FILES) $(ARGS)

demo: $(STAMP)
	$(PY) -m finetune demo medical

recipes: $(STAMP)
	$(PY) -m finetune recipes

# CI's command: everything but the accuracy bars and the rest of the engine matrices (`extended`)
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=40 -m "not extended" tests

# every test, the accuracy bars and every engine variant included
test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=40 tests

# the inner loop: unit tests and the family contract suite, under 3 minutes on 2 cores
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not quality and not extended and not gpu" tests

clean:
	rm -rf runs data/demo

bench-packing: $(STAMP)
	$(PY) bench/packing.py

# the project's GPU checks in at most ~8 minutes on one H100/H200 started bare (bench/gpu_check.py; the
# parts in priority order under one deadline), results in bench/results/<date>-<gpu>.md, rewritten after
# every part and copied to $OUT when that is set (here too, even when a part fails; the status is kept).
# On a bare GPU machine carry .whl (bash tools/gpu_wheels.sh): installed into /tmp/site first, counted in
# the deadline. DRY=1: every part on the CPU with tiny shapes (tests the driver; no set-up, no wheels).
# It never installs from the network: GPU machines have none.
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	@start=$$(date +%s); wrote=$$(mktemp); \
	if [ -d .whl ] && [ -z "$(DRY)" ]; then \
		python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
		|| { echo "gpu-check: the carried wheels did not install"; exit 1; }; export PYTHONPATH=/tmp/site$${PYTHONPATH:+:$$PYTHONPATH}; fi; \
	GPU_CHECK_T0=$$start GPU_CHECK_WROTE=$$wrote $(GPU_PY) bench/gpu_check.py $(if $(DRY),--dry) $(ARGS); rc=$$?; \
	if [ -n "$$OUT" ] && [ -s "$$wrote" ] && [ -f "$$(cat $$wrote)" ]; then cp "$$(cat $$wrote)" "$$OUT"/; fi; \
	rm -f "$$wrote"; exit $$rc
