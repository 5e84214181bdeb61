#!/usr/bin/env bash
# Wheels of the locked versions for a lent GPU machine (Python 3.12, torch already there, no network):
#   bash tools/gpu_wheels.sh        # -> .whl/ (ignored by git; about 62 MB: carry it, see `make gpu-check`)
# Only what that machine lacks or has at another version: transformers, peft, trl, accelerate,
# datasets (+ dill, multiprocess), bitsandbytes, soundfile, deepspeed (+ its small deps). Versions from
# requirements/lock.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
pins=()
for name in transformers peft trl accelerate datasets dill multiprocess bitsandbytes soundfile; do
  line=$(grep -i "^${name}==" requirements/lock.txt) || { echo "not in the lock: $name" >&2; exit 1; }
  pins+=("$line")
done
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${pins[@]}"
# DeepSpeed is published as source only: its wheel is built here (pure Python with DS_BUILD_OPS=0)
# with its small dependencies (einops, hjson, msgpack, ninja, py-cpuinfo)
ds=$(grep -i "^deepspeed==" requirements/lock.txt)
# (its setup imports torch: built with the project venv's python)
DS_BUILD_OPS=0 "${PY:-.venv/bin/python}" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$ds"
dsdeps=()
for name in einops hjson msgpack ninja py-cpuinfo; do dsdeps+=("$(grep -i "^${name}==" requirements/lock.txt)"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${dsdeps[@]}"
du -sh .whl
