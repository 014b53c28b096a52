#!/usr/bin/env bash
# Issue 18's GPU measurements in one device call (≈ 6.5 min on an H200), on the full SD-2.1-base /
# DINOv2-giant shapes with random weights (no download, no Ray): raw JSON and logs under $OUT (7
# files; a device call brings back at most 8), side by side in one run — generation levers,
# training-step levers, sampling — each with the matmul rate measured in its own process (the MFU
# denominator) and a profiler summary. Exits 1 if any part failed or ran out of time (all.log has
# each part's "=== name: rc=" line); a part cut short still keeps the rows it wrote.
#
#   here first: bash benchmarks/gpu_prepare.sh   (wheels the device lacks → .whl/, CLIP BPE → .cache/)
#   the device call (carry .whl and .cache; BENCHMARKS.md "GPU plan (issue 18)"):
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#         --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/gpu_all.sh
#   dry run here on the CPU, tiny preset, smallest settings (the default parts ≈ 1.5 min; with
#   train_compile ≈ 3–5 min):
#     PY=.venv/bin/python PRESET=tiny DEVICE=cpu SCALE=0 OUT=/tmp/gpu_dry bash benchmarks/gpu_all.sh
#   other parts, e.g. those that compile for minutes (not in the default set), in a second call:
#     ONLY=train_compile,generation_autotune bash benchmarks/gpu_all.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
PY=${PY:-python3}
PRESET=${PRESET:-sd21-base-random}
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-1}           # 0: smallest settings (dry runs)
ONLY=${ONLY:-generation,train_step,sampling}  # comma-separated subset; more: see below
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
if [ -f .cache/bpe_simple_vocab_16e6.txt.gz ]; then  # carried there by gpu_prepare.sh
  export M2M_RAY_CLIP_BPE=${M2M_RAY_CLIP_BPE:-$PWD/.cache/bpe_simple_vocab_16e6.txt.gz}
  export M2M_RAY_CACHE=${M2M_RAY_CACHE:-$PWD/.cache}
fi
mkdir -p "$OUT"
LOG="$OUT/all.log"
FAILED=""
{
  date -u; uname -a
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  "$PY" -c "import torch, diffusers, transformers, pydantic; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'pydantic', pydantic.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

run() {  # run NAME LIMIT_S CMD...: stdout+stderr into all.log, stdout alone into NAME.txt
  local name=$1 limit=$2; shift 2
  [[ ",$ONLY," == *",$name,"* ]] || return 0
  echo "=== $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" 2>>"$LOG" | tee -a "$OUT/$name.txt" >>"$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - start)) s" | tee -a "$LOG"
  [ "$rc" = 0 ] || FAILED="$FAILED $name(rc=$rc)"
}

if [ "$SCALE" = 0 ]; then
  GEN="--captions 2 --steps 2 --images-per-caption 4"
  TRAIN="--images-per-set 3 --steps 1 --warmup 1"; BIG=2; SMALL=2
  SAMPLE="--batch 2 --steps 2 --repeats 1 --warmup 1 --warmup-steps 1 --profile-steps 1"
  EVAL="--images 2 --batch 2"; ATTN="--repeats 1 --budget 1"
else  # the paper's settings: 50 Euler steps, 25 images per caption, 512 px; N = 8, K ≤ 8
  GEN="--captions 2 --steps 50 --warmup-steps 2 --profile-steps 3"
  TRAIN="--images-per-set 8 --steps 4 --warmup 2 --precision bf16"; BIG=8; SMALL=2
  SAMPLE="--batch 8 --steps 50 --repeats 1 --warmup 1 --warmup-steps 2 --profile-steps 3"
  EVAL="--images 512 --batch 64"; ATTN="--repeats 3 --budget 10"
fi
# 1. Generation (≈ 3 min): naive vs ours, then one lever at a time against the fp16 eager
#    reference (drift reported), compile last (it compiles on the warm-up batch, ≈ 1–2 min).
# shellcheck disable=SC2086
run generation 190 "$PY" benchmarks/generation.py --preset "$PRESET" --device "$DEVICE" \
    --dtype float16 $GEN --variants c2 c2-bf16 c2-fused c2-fused-compile --profile \
    --out "$OUT/generation.json"
# 2. Training step (≈ 1.5 min), one process each: bf16 autocast; checkpointing on at BIG sets
#    (the current default), + fused AdamW (profiled), checkpointing off at SMALL sets (and at 1
#    set if SMALL runs out of memory: OOM is a result), DINO at BIG sets.
train_steps() {
  local t="$PY benchmarks/train_step.py --preset $PRESET --device $DEVICE $TRAIN" rc=0 out
  echo "+ self, $BIG sets, checkpointing" >&2
  $t --variant self --batch-size "$BIG" --gradient-checkpointing || rc=1
  echo "+ self, $BIG sets, checkpointing, fused AdamW, profiled" >&2
  $t --variant self --batch-size "$BIG" --gradient-checkpointing --fused-adamw --profile || rc=1
  echo "+ self, $SMALL sets, no checkpointing, fused AdamW" >&2
  out=$($t --variant self --batch-size "$SMALL" --no-gradient-checkpointing --fused-adamw) || rc=1
  echo "$out"
  if [[ $out == *'"oom": true'* ]]; then
    echo "+ self, 1 set, no checkpointing, fused AdamW" >&2
    $t --variant self --batch-size 1 --no-gradient-checkpointing --fused-adamw || rc=1
  fi
  echo "+ dino, $BIG sets, checkpointing, fused AdamW" >&2
  $t --variant dino --batch-size "$BIG" --gradient-checkpointing --fused-adamw || rc=1
  return $rc
}
export -f train_steps
export PY PRESET DEVICE TRAIN BIG SMALL
run train_step 120 bash -c train_steps
# 3. Sampling (≈ 1.5 min): plain, sd-text, Self cached, DINO at K = 1, 4, 8; uncached at 8 only
#    (9× the FLOPs; the cache goal is at K = 8); profile of plain and DINO at K = 8.
# shellcheck disable=SC2086
run sampling 90 "$PY" benchmarks/sampling.py --preset "$PRESET" --device "$DEVICE" $SAMPLE \
    --contexts 1,4,8 --uncached-contexts 8 --profile --out "$OUT/sampling.json"
# Not in the default set (minutes each, for a second call): compiled training, max-autotune
# generation, and the earlier attention and evaluation benchmarks.
# shellcheck disable=SC2086
run train_compile 300 "$PY" benchmarks/train_step.py --preset "$PRESET" --device "$DEVICE" $TRAIN \
    --variant self --batch-size "$BIG" --gradient-checkpointing --fused-adamw --compile
# shellcheck disable=SC2086
run generation_autotune 400 "$PY" benchmarks/generation.py --preset "$PRESET" \
    --device "$DEVICE" --dtype float16 $GEN --variants c2-fused c2-fused-compile:max_autotune \
    --out "$OUT/generation_autotune.json"
# shellcheck disable=SC2086
run attention 70 "$PY" benchmarks/attention.py --preset "$PRESET" --device "$DEVICE" $ATTN
# shellcheck disable=SC2086
run eval 60 "$PY" benchmarks/eval_throughput.py --device "$DEVICE" $EVAL
echo "done: $(ls "$OUT")"
if [ -n "$FAILED" ]; then
  echo "failed:$FAILED" | tee -a "$LOG"
  exit 1
fi
