#!/usr/bin/env bash
# Wheels for a lent GPU machine (CPython 3.12, linux x86_64, torch 2.11+cu130 and the packages of
# tools/gpu_machine_packages.txt already there, no network):
#   bash tools/gpu_wheels.sh        # -> .whl/ (ignored by git; about 25 MB: carry it, see `make gpu-check`)
# What it carries is tools/gpu_wheels.txt, at the versions of requirements/lock.txt; tests/test_gpu_check.py
# checks that every requirement of those wheels (and of pyproject.toml) is met by them or by the machine,
# and that they and the working tree stay under the device's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}  # builds the source-only ones (DeepSpeed's setup imports torch)
download=()
build=()
while read -r name how _; do
  pin=$(grep -i "^${name}==" requirements/lock.txt) || { echo "not in requirements/lock.txt: $name" >&2; exit 1; }
  if [ "${how:-}" = build ]; then build+=("$pin"); else download+=("$pin"); fi
done < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' tools/gpu_wheels.txt)
platforms=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for n in $(seq 5 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "${download[@]}"
# published as source only (DeepSpeed, rouge-score): pure-Python wheels built here, DeepSpeed without
# its CUDA ops (DS_BUILD_OPS=0; ZeRO with torch's optimizers needs none)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "${build[@]}"
# bitsandbytes ships its library for every CUDA and ROCm release (43 MB): only the CPU one and CUDA 13's
# (the machine's torch is a cu130 build; bitsandbytes picks the library by torch.version.cuda) are kept,
# with RECORD rewritten to match
"$PY" - .whl/bitsandbytes-*.whl <<'EOF'
import re, sys, zipfile
from pathlib import Path

path = Path(sys.argv[1])
drop = re.compile(r"bitsandbytes/libbitsandbytes_(?!cpu\.|cuda13\d\.)[^/]+$")
tmp = path.with_suffix(".tmp")
with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if drop.search(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = "".join(line for line in data.decode().splitlines(keepends=True)
                           if not drop.search(line.split(",", 1)[0])).encode()
        dst.writestr(info, data)
tmp.replace(path)
EOF
ls .whl
du -sh .whl
