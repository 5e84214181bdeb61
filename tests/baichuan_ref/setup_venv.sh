#!/usr/bin/env bash
# Create (idempotently) the separate virtual environment in which the PUBLIC Baichuan-Omni-1.5
# reference code (baichuan-inc/Baichuan-Omni-1.5, baichuan-omni/model/*.py) can be imported and
# its OmniForCausalLM built on the CPU. It is NOT the toolkit's venv: the reference needs
# transformers 4.45 (it subclasses the 4.45 Qwen2-VL vision tower) and diffusers 0.24, while the
# toolkit uses transformers 5.
#
#   bash tests/baichuan_ref/setup_venv.sh            # venv at $FINETUNE_BAICHUAN_VENV
#   FINETUNE_BAICHUAN_VENV=/some/dir bash tests/baichuan_ref/setup_venv.sh
#
# Only CPU torch is installed; flash_attn, deepspeed and the media libraries (decord, cv2, av,
# imagesize, cairosvg, fire, torchaudio) are NOT installed: tests/baichuan_ref/stubs/ stands in for
# them (see the comments there).
set -euo pipefail

VENV="${FINETUNE_BAICHUAN_VENV:-$HOME/.cache/omni-finetune/baichuan-ref-venv}"
PYTHON="${PYTHON:-python3}"

# Pinned versions. torch: the reference pins 2.4.0; any CPU 2.x works for these model classes and
# 2.13.0 is the build this project uses. transformers: 4.45.x (the reference was written against
# 4.45.0.dev0). diffusers 0.24.0 (pinned by the reference) imports `cached_download`, which
# huggingface_hub removed in 0.26, hence huggingface_hub 0.25.2. tokenizers 0.20.x is what
# transformers 4.45 accepts. numpy < 2 for diffusers 0.24 (released before numpy 2).
PKGS=(
  "torch==2.13.0"
  "transformers==4.45.2"
  "tokenizers==0.20.3"
  "huggingface_hub==0.25.2"
  "diffusers==0.24.0"
  "numpy==1.26.4"
  "safetensors"
  "einops"
  "omegaconf"
  "easydict"
  "ujson"
  "Pillow"
  "requests"
)

echo "[setup_venv] venv: $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup_venv] creating venv with $($PYTHON --version 2>&1) ($PYTHON)"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
else
  echo "[setup_venv] venv exists"
fi

# Skip pip when every pin is already satisfied (idempotent and fast on re-runs).
if "$VENV/bin/python" - "${PKGS[@]}" <<'EOF'
import sys
from importlib import metadata
ok = True
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        ok = False
        continue
    if want and have.split("+")[0] != want:
        ok = False
sys.exit(0 if ok else 1)
EOF
then
  echo "[setup_venv] all pinned packages already installed"
else
  # torch first and alone: pip must pick the CPU wheel (no CUDA build, no torchvision/torchaudio).
  # The package registry configured on the machine serves the CPU wheel (torch-2.13.0+cpu).
  echo "[setup_venv] pip install torch==2.13.0 (CPU build)"
  "$VENV/bin/pip" install --quiet --no-deps "torch==2.13.0"
  # torch's own pure-python requirements (no nvidia-* wheels: they are CUDA-only extras of the
  # CUDA build, which we did not install).
  "$VENV/bin/pip" install --quiet filelock typing-extensions sympy networkx jinja2 fsspec
  echo "[setup_venv] pip install ${PKGS[*]:1}"
  "$VENV/bin/pip" install --quiet "${PKGS[@]:1}"
fi

"$VENV/bin/python" - <<'EOF'
import torch, transformers, diffusers, huggingface_hub, numpy, tokenizers
print(f"[setup_venv] torch {torch.__version__} (cuda build: {torch.version.cuda}), "
      f"transformers {transformers.__version__}, diffusers {diffusers.__version__}, "
      f"huggingface_hub {huggingface_hub.__version__}, tokenizers {tokenizers.__version__}, "
      f"numpy {numpy.__version__}")
EOF
echo "[setup_venv] done: $VENV/bin/python"
