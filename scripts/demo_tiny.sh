#!/usr/bin/env bash
# The machinery demo on the offline `tiny` preset (random small models: every image is noise), on a
# local Ray; the main job is scripts/demo.sh (the shapes world). Set up (if needed), then:
# build a small MIS → train M2M-Self a few steps → generate auto-regressively → evaluate.
# Everything lands under outputs/tiny/. Each step is the same entry script a cluster job runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
export PYTHONUNBUFFERED=1

step() { echo; echo "=== $1"; }
step "1/4 build MIS (captions → 25-image sets, Parquet + WebDataset)"
$PY pipelines/build_mis.py --config configs/tiny/build_mis.yaml "$@"
$PY -m m2m_ray.mis.verify outputs/tiny/mis
$PY -m m2m_ray.mis.preview outputs/tiny/mis --out outputs/tiny/mis_preview.png --sets 6

step "2/4 train M2M-Self on Ray Train (TorchTrainer, 2 workers)"
$PY pipelines/train.py --config configs/tiny/train.yaml

step "3/4 generate auto-regressively from MIS test sets"
$PY pipelines/generate.py --config configs/tiny/generate.yaml

step "4/4 evaluate (FID, IS, CLIP-T, CLIP-I per k; tiny extractors)"
$PY pipelines/evaluate.py --config configs/tiny/evaluate.yaml

echo
echo "done: outputs/tiny/ (mis/, mis_preview.png, train/, model/, generations/, eval_generations/eval/report.{json,md,png})"
