#!/usr/bin/env bash
# Here, before a device call of benchmarks/gpu_all.sh: the device has torch and transformers but
# neither diffusers nor a package index, so its wheel travels in .whl/ (with the CLIP BPE file in
# .cache/); the device call carries both (BENCHMARKS.md "GPU plan").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
version=$("$PY" -c "import diffusers; print(diffusers.__version__)")
"$PY" -m pip download --quiet --no-deps --only-binary=:all: "diffusers==$version" -d .whl
M2M_RAY_CACHE=$PWD/.cache "$PY" -c "from m2m_ray.models.clip_tokenizer import fetch_bpe; print(fetch_bpe())"
ls -l .whl .cache
