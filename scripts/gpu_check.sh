#!/usr/bin/env bash
# tokensel GPU check: one command on a bare NVIDIA H100/H200 machine with no internet whose image has torch 2.11
# (CUDA), triton 3.6, transformers 5.17, lightning 2.6.6 (python 3.12). Target wall time: under 8 minutes.
#   bash scripts/gpu_check.sh              results in $OUT (default /tmp/gpu_check_out), summary printed last
#   bash scripts/gpu_check.sh --dry-run    what a CPU machine can check: shell syntax, the wheel list against
#                                          .gpu/whl, the scripts it calls, the environment probe without a GPU
# Packages the image lacks travel as wheels in .gpu/whl/ (scripts/gpu_wheels.txt; scripts/fetch_wheels.sh
# downloads them and stages SmolLM2's config + tokenizer in .gpu/smollm2/). With the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=540), then give_back().
# GPU_CHECK_BUDGET_S=300 for a shorter run: later steps are skipped, never cut mid-way.
#
# Steps (each time-capped; a global deadline trims the later ones), files in $OUT:
#   0. env.txt      install the carried wheels into /tmp/site (--no-deps --no-index; src/ first on PYTHONPATH),
#                   build + install the project offline (packaging smoke test)
#   1. env.txt      versions, pyproject requirement check, imports, device facts, cuBLAS / copy ceilings, the
#                   fp32-output matmul mode of the fused CE's dX accumulation (scripts/gpu/probe.py)
#   2. pytest.log   pytest -m gpu tests/kernels, then the rest of tests/kernels natively on the GPU
#   3. flce_profile.txt  fused CE at N=16384 H=4096 V=128256 bf16 vs the in-run cuBLAS floor (scripts/gpu/flce_profile.py)
#   4. fused_ce_gpu.md   benchmarks/fused_ce.py (eager, chunked torch, Liger, CCE, ours)
#   5. llsa_gpu.md       benchmarks/llsa.py: Triton LLSA vs SDPA, bf16, 1k-64k tokens
#   6. sstoken.log  20 bf16 steps of recipes/sstoken.yaml on SmolLM2-135M with the Triton LM head
#   7. summary.txt  (also printed last)
# Never touches clocks / power / MIG / persistence: nvidia-smi is only queried.
set -uo pipefail
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--dry-run]"; exit 2 ;;
esac
ROOT=$(cd "$(dirname "$0")/.." 2>/dev/null && pwd)
[ -n "$ROOT" ] && [ -f "$ROOT/pyproject.toml" ] && cd "$ROOT"
[ -f pyproject.toml ] || { echo "gpu_check: run from the project root (pyproject.toml not found)"; exit 2; }
OUT=${OUT:-/tmp/gpu_check_out}; mkdir -p "$OUT"
T0=$(date +%s); BUDGET=${GPU_CHECK_BUDGET_S:-465}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
SUM=$OUT/summary.txt; : > "$SUM"
note() { echo "$*" | tee -a "$SUM"; }
# step NAME CAP_S LOGFILE cmd...: run with min(CAP, time left - 5) seconds; record rc and duration
step() {
  local name=$1 cap=$2 log=$3; shift 3
  local l; l=$(left); local lim=$(( cap < l - 5 ? cap : l - 5 ))
  if [ "$DRY" = 1 ]; then note "PLAN  $name (cap ${cap}s) -> $(basename "$log")"; return 0; fi
  if [ "$lim" -lt 15 ]; then note "SKIP  $name (no time left)"; return 99; fi
  echo "===== $name (cap ${lim}s) =====" >> "$log"
  local s; s=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$lim" "$@" >> "$log" 2>&1
  local rc=$?
  note "$( [ $rc -eq 0 ] && echo 'OK  ' || echo "RC=$rc" ) $name ($(( $(date +%s) - s ))s)$( [ $rc -eq 124 ] && echo ' TIMED OUT' )"
  return $rc
}

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET TOKENSEL_KERNELS TRITON_F32_DEFAULT
export TRITON_CACHE_DIR=/tmp/triton_cache
ENVF=$OUT/env.txt; : > "$ENVF"

# ---------------------------------------------------------------- dry run: what a CPU machine can check
if [ "$DRY" = 1 ]; then
  bash -n "$0" && note "OK    shell syntax ($0)" || { note "FAIL  shell syntax"; exit 1; }
  missing=0
  for spec in $(grep -v '^\s*#' scripts/gpu_wheels.txt | sed 's/#.*//' | awk 'NF {print $1}'); do
    name=${spec%%==*}; ver=${spec#*==}; stem=$(echo "$name" | tr '-' '_')
    if ls .gpu/whl/"${stem}"-"${ver}"-*.whl >/dev/null 2>&1; then note "OK    wheel $spec"
    else note "MISS  wheel $spec (bash scripts/fetch_wheels.sh)"; missing=$((missing + 1)); fi
  done
  [ -f .gpu/smollm2/config.json ] && note "OK    .gpu/smollm2 (SmolLM2 config + tokenizer)" \
    || note "MISS  .gpu/smollm2 (the ssToken step then needs a local SmolLM2 copy)"
  for f in scripts/gpu/probe.py scripts/gpu/flce_profile.py scripts/gpu/smollm2_model.py benchmarks/fused_ce.py \
           benchmarks/llsa.py recipes/sstoken.yaml; do
    [ -f "$f" ] && note "OK    $f" || { note "FAIL  $f missing"; exit 1; }
  done
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  if python3 scripts/gpu/probe.py --dry-run >> "$ENVF" 2>&1; then note "OK    environment probe (dry run) -> env.txt"
  else note "FAIL  environment probe (see env.txt)"; cat "$ENVF"; exit 1; fi
  grep -E "^  (BAD|FAIL)" "$ENVF" | sed 's/^/      /' | tee -a "$SUM"
  note "      $missing carried wheel(s) missing; steps a GPU run would take:"
fi

# ---------------------------------------------------------------- 0. wheels + project
{ echo "date: $(date -Is)"; uname -a
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu \
    --format=csv 2>&1; } >> "$ENVF"
if ls .gpu/whl/*.whl >/dev/null 2>&1 || [ "$DRY" = 1 ]; then
  step "install carried wheels" 90 "$ENVF" python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
else
  note "WARN  no wheels in .gpu/whl: jsonargparse/datasets (CLI, data) and Liger/CCE (comparisons) are absent"
fi
[ "$DRY" = 1 ] || export PYTHONPATH="$PWD/src:/tmp/site"
step "pip install --no-deps . (offline build)" 60 "$ENVF" python3 -m pip install -q --no-index --no-deps \
  --no-build-isolation --no-cache-dir --target /tmp/pkg .

# ---------------------------------------------------------------- 1. environment probe
step "env probe" 90 "$ENVF" python3 scripts/gpu/probe.py

# ---------------------------------------------------------------- 2. tests
PYT=$OUT/pytest.log; : > "$PYT"
PYTEST=(python3 -m pytest -p no:cacheprovider -rfEs --durations=8)
step "pytest -m gpu tests/kernels" 150 "$PYT" "${PYTEST[@]}" -m gpu tests/kernels
step "pytest tests/kernels -m 'not gpu' (native CUDA)" 150 "$PYT" "${PYTEST[@]}" -m "not gpu" tests/kernels \
  --ignore=tests/kernels/test_aot_compile.py  # the AOT compile test is the CPU machines' stand-in for this run
[ "$DRY" = 1 ] || grep -E "^(FAILED|ERROR) |^=+ .*(passed|failed|error).* in [0-9.]+s.* =+$" "$PYT" | tail -30 >> "$SUM"

# ---------------------------------------------------------------- 3. fused CE profile at the target shape
step "fused CE profile N=16384 H=4096 V=128256" 110 "$OUT/flce_profile.txt" python3 scripts/gpu/flce_profile.py

# ---------------------------------------------------------------- 4-5. benchmarks
step "benchmarks/fused_ce.py (2 shapes)" 120 "$OUT/bench.log" python3 benchmarks/fused_ce.py \
  --shapes 16384,4096,128256 4096,2048,32000 --reps 5 --warmup 1 --out "$OUT/fused_ce_gpu.md"
step "benchmarks/llsa.py cuda bf16" 80 "$OUT/bench.log" python3 benchmarks/llsa.py --device cuda --dtype bfloat16 \
  --heads 8 --reps 5 --min-time 0.2 --max-dense-bwd-n 65536 --out "$OUT/llsa_gpu.md"

# ---------------------------------------------------------------- 6. a real training run on the Triton head
LM=/tmp/smollm2
step "SmolLM2-135M folder (real weights if local, else config + random weights)" 60 "$OUT/sstoken.log" \
  python3 scripts/gpu/smollm2_model.py "$LM"
[ "$DRY" = 1 ] || LM=$(sed -n "s/.*model folder: //p" "$OUT/sstoken.log" | tail -1)
step "ssToken 20 bf16 steps, Triton LM head" 120 "$OUT/sstoken.log" python3 -m tokensel fit \
  --config recipes/sstoken.yaml --model.init_args.model "$LM" --model.init_args.kernels triton \
  --model.init_args.dtype bfloat16 --trainer.precision bf16-mixed --trainer.accelerator gpu \
  --trainer.max_steps 20 --trainer.val_check_interval 20 --trainer.summary_every_n_steps 5 \
  --data.init_args.batch_size 8 --trainer.default_root_dir "/tmp/sstoken_run_$$" --trainer.logger false

# ---------------------------------------------------------------- 7. summary (printed last)
if [ "$DRY" = 0 ]; then
  {
    echo; echo "--- env (abridged)"; grep -E "^(python|device|ceiling|fused CE|  dX|  BAD|  FAIL)" "$ENVF"
    echo; echo "--- fused CE profile"; grep -v "^=====" "$OUT/flce_profile.txt" 2>/dev/null | tail -45
    echo; echo "--- fused_ce_gpu.md (table)"; grep -E "^\|" "$OUT/fused_ce_gpu.md" 2>/dev/null | head -40
    echo; echo "--- llsa_gpu.md (table)"; grep -E "^\|" "$OUT/llsa_gpu.md" 2>/dev/null
    echo; echo "--- ssToken run"; grep -E "tokensel: step|Error|error:" "$OUT/sstoken.log" 2>/dev/null | tail -8
    echo; echo "total $(( $(date +%s) - T0 ))s; files: $(ls "$OUT" | tr '\n' ' ')"
  } >> "$SUM"
  nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv >> "$ENVF" 2>&1
fi
echo; echo "==================== SUMMARY ($OUT/summary.txt) ===================="; cat "$SUM"
