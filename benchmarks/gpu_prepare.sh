#!/usr/bin/env bash
# Here, after the README's set-up (it uses .venv), before a device call of benchmarks/gpu_all.sh:
# the device image has torch and transformers but neither diffusers nor pydantic (the package list
# in the device tool's KINDS.md) and no index to install them from, so their wheels travel in
# .whl/ — at this venv's versions, for the device's Python 3.12 — with the CLIP BPE file in
# .cache/. The device call carries both (BENCHMARKS.md "GPU plan (issue 18)").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# pydantic's own needs come along, typing_extensions too: pydantic wants a recent one.
PACKAGES=(diffusers pydantic pydantic_core annotated-types typing-inspection typing_extensions)
rm -rf .whl && mkdir .whl
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$name==$version"
done
M2M_RAY_CACHE=$PWD/.cache "$PY" -c "from m2m_ray.models.clip_tokenizer import fetch_bpe; print(fetch_bpe())"
ls -l .whl .cache
