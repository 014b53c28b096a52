#!/usr/bin/env bash
# Every GPU benchmark of the project in one device call, on the full SD-2.1-base / DINOv2-giant
# shapes with random weights (no download, no Ray): results and logs under $OUT.
#
#   device run (carry .whl and .cache; see BENCHMARKS.md "GPU runs"):
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#         --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/gpu_all.sh
#   dry run here on the CPU with the tiny preset:
#     PRESET=tiny DEVICE=cpu OUT=/tmp/gpu_dry bash benchmarks/gpu_all.sh
#   only some of them (the open question as of 2026-11-26: DINO vs plain at 50 steps, batch 8):
#     ONLY=sampling bash benchmarks/gpu_all.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
PRESET=${PRESET:-sd21-base-random}
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-1}           # 0: smallest settings (dry runs)
ONLY=${ONLY:-generation,sampling,train_step,attention,eval}  # comma-separated subset
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
export M2M_RAY_CLIP_BPE=${M2M_RAY_CLIP_BPE:-$PWD/.cache/bpe_simple_vocab_16e6.txt.gz}
export M2M_RAY_CACHE=${M2M_RAY_CACHE:-$PWD/.cache}
mkdir -p "$OUT"
LOG="$OUT/all.log"
{
  date -u; uname -a
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

run() {  # run NAME LIMIT_S CMD...: stdout+stderr into all.log, stdout alone into NAME.txt
  local name=$1 limit=$2; shift 2
  [[ ",$ONLY," == *",$name,"* ]] || return 0
  echo "=== $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" 2>>"$LOG" | tee "$OUT/$name.txt" >>"$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - start)) s" | tee -a "$LOG"
}

if [ "$SCALE" = 0 ]; then
  GEN_ARGS="--captions 2 --steps 2 --images-per-caption 4"; SAMPLE_ARGS="--steps 2 --repeats 1 --warmup 0"
  TRAIN_ARGS="--batch-size 1 --images-per-set 3 --steps 1 --warmup 1"; EVAL_ARGS="--images 2 --batch 2"
  ATTN_ARGS="--repeats 1 --budget 1"
else
  GEN_ARGS="--captions 4 --steps 30 --captions-per-batch 2"; SAMPLE_ARGS="--batch 8 --steps 50 --repeats 2 --warmup 1"
  TRAIN_ARGS="--batch-size 8 --images-per-set 8 --steps 8 --warmup 2 --precision bf16"
  EVAL_ARGS="--images 512 --batch 64"; ATTN_ARGS="--repeats 3 --budget 10"
fi
# shellcheck disable=SC2086
run generation 170 python3 benchmarks/generation.py --preset "$PRESET" --device "$DEVICE" \
    --dtype float16 $GEN_ARGS --out "$OUT/generation.json"
# shellcheck disable=SC2086
run sampling 300 python3 benchmarks/sampling.py --preset "$PRESET" --device "$DEVICE" $SAMPLE_ARGS \
    --out "$OUT/sampling.json"
# shellcheck disable=SC2086
run train_step 120 python3 benchmarks/train_step.py --preset "$PRESET" --device "$DEVICE" \
    --variant both $TRAIN_ARGS
# shellcheck disable=SC2086
run attention 70 python3 benchmarks/attention.py --preset "$PRESET" --device "$DEVICE" $ATTN_ARGS
# shellcheck disable=SC2086
run eval 60 python3 benchmarks/eval_throughput.py --device "$DEVICE" $EVAL_ARGS
echo "done: $(ls "$OUT")"
