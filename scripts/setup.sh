#!/usr/bin/env bash
# Create .venv (Python 3.11), install m2m_ray with its dev extras, fetch the CLIP BPE file.
# Idempotent: a second run only checks. GPU clusters: see README "Installing on GPU machines".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # the CPU wheel on local disk; override on GPU machines

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.m2m_ray-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install --quiet --upgrade pip
  # torch first, pinned, so nothing below resolves an unpinned torch to a multi-GB CUDA build.
  python -m pip install --quiet "$TORCH_SPEC"
  python -m pip install --quiet -e '.[dev]'
  touch "$stamp"
fi
# clean-fid, a test-only reference for FID (tests/test_eval_fid_reference.py), cannot sit in .[dev]:
# its metadata requires torch and torchvision unpinned, which would pull torchvision (kept out on
# purpose) and possibly a multi-GB CUDA torch. --no-deps installs only its code; the modules the
# tests import (cleanfid.resize, cleanfid.inception_torchscript) need only numpy, torch, Pillow
# and requests, all already here.
if ! python -m pip show clean-fid 2>/dev/null | grep -qx "Version: 0.1.35"; then
  python -m pip install --quiet --no-deps "clean-fid==0.1.35"
fi
python -m m2m_ray.models.clip_tokenizer fetch >/dev/null
echo "m2m_ray environment ready: $(python -c 'import m2m_ray, torch, ray; print("m2m_ray", m2m_ray.__version__, "torch", torch.__version__, "ray", ray.__version__)')"
