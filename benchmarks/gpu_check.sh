#!/usr/bin/env bash
# BERT-Large on one GPU, bertscale against Hugging Face transformers, in under 5 minutes:
#   phase 1 (seq 128, micro-batch 128) and phase 2 (seq 512, micro-batch 32), bf16 autocast over
#   fp32 weights, fused AdamW, SDPA (flash where it applies), for both models alike; then the
#   same with real Wikipedia lengths (benchmarks/wiki_lengths.json) and bertscale's unpadding;
#   then a torch.compile variant and the micro-batch finder if time is left.
# Prints throughput, TFLOP/s and MFU against a bf16 matmul peak measured on the same GPU.
#
#   bash benchmarks/gpu_check.sh            # from the repository root or anywhere
#   GPU_CHECK_OUT=dir PYTHON=python3 bash benchmarks/gpu_check.sh
#
# Needs: python3 with a CUDA build of torch (checked first). transformers is optional: without
# it, bertscale's side runs alone and the script says so. Python wheels in benchmarks/wheels/ (or
# $GPU_CHECK_WHEELS) are installed offline into a temporary folder first, for machines with no
# package index. Each step has its own time limit; a failed step is reported and the next runs;
# the summary at the end shows whatever finished.
# Exit status: 0 when every step passed, 2 when a step failed or timed out, 1 when there is no
# CUDA torch to measure with. Nothing is written outside the results folder: Python's bytecode
# is off, and temporary files (installed wheels, torch.compile's and Triton's caches) go to a
# scratch folder removed at exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Relative paths given by the caller are relative to where the script was started, not $ROOT.
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
PY="${PYTHON:-python3}"
case "$PY" in */*) PY="$(abspath "$PY")" ;; esac
RESULTS="$(abspath "${GPU_CHECK_OUT:-$ROOT/gpu_check_results}")"
WHEELS="$(abspath "${GPU_CHECK_WHEELS:-$ROOT/benchmarks/wheels}")"
cd "$ROOT"
BUDGET="${GPU_CHECK_BUDGET_S:-270}"   # optional steps start only while under this many seconds
# Overridable for a dry run of the script itself on a CPU (e.g. PRESET=tiny DEVICE=cpu DTYPE=fp32).
PRESET="${PRESET:-large}" DEVICE="${DEVICE:-cuda}" DTYPE="${DTYPE:-bf16}"
BATCH1="${BATCH1:-128}" BATCH2="${BATCH2:-32}" REPEATS="${REPEATS:-8}"
PEAK_N="${PEAK_N:-}"   # size of the peak-measuring matmul; default by device (8192 on CUDA)
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
: > "$LOG"
RUNS=(phase1 phase2 phase1_real_unpad phase2_real_unpad phase1_compile)
for run in "${RUNS[@]}"; do rm -f "$RESULTS/$run.json"; done  # a stale one would pass as new
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
export TMPDIR="$SCRATCH" TORCHINDUCTOR_CACHE_DIR="$SCRATCH/inductor"
export TRITON_CACHE_DIR="$SCRATCH/triton" CUDA_CACHE_PATH="$SCRATCH/nv"
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S COMMAND...: run with its own limit; never stops the script.
FAILED=()
step() {
  local name="$1" limit="$2"; shift 2
  say ""
  say "== $name (limit ${limit}s, t=${SECONDS}s)"
  local rc=0
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" || rc=$?
  if [ "$rc" -ne 0 ]; then
    # 124: timeout's TERM ended it; 137: it ignored TERM and was killed 10 s later.
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then say "!! $name: timed out after ${limit}s"
    else say "!! $name: failed (exit $rc)"; fi
    FAILED+=("$name")
  fi
}

say "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT"
ON_CUDA=0
case "$DEVICE" in cuda*) ON_CUDA=1 ;; esac
if [ "$ON_CUDA" = 1 ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)' 2>>"$LOG"; then
  say "gpu_check: $PY cannot import torch with CUDA (or sees no GPU); nothing to measure"
  exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee -a "$LOG" || true

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE="$SCRATCH/site"
  step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
if "$PY" - <<'PY' 2>&1 | tee -a "$LOG"
import torch
try:
    import transformers
    hf = f"transformers {transformers.__version__}"
except ImportError:
    hf = "transformers MISSING: only bertscale's numbers will be measured"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {gpu}, {hf}")
PY
then :; else say "!! $PY could not report its torch and transformers versions"; fi

# Correctness first: the variable-length flash kernel against the per-sequence path.
step parity 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_fastpaths.py -k cuda

step peak 60 "$PY" -m bertscale.perf --device "$DEVICE" --dtype "$DTYPE" ${PEAK_N:+--n "$PEAK_N"}

BENCH=("$PY" -m bertscale.bench model --preset "$PRESET" --dtype "$DTYPE" --device "$DEVICE"
       --optimizer-impl fused --warmup 2 --repeats "$REPEATS" --steps 3
       ${PEAK_N:+--peak-n "$PEAK_N"})
step phase1 150 "${BENCH[@]}" --seq-len 128 --batch "$BATCH1" --out "$RESULTS/phase1.json"
step phase2 150 "${BENCH[@]}" --seq-len 512 --batch "$BATCH2" --out "$RESULTS/phase2.json"
step phase1_real_unpad 150 "${BENCH[@]}" --seq-len 128 --batch "$BATCH1" --unpad \
  --lengths-from benchmarks/wiki_lengths.json --num-batches 8 --out "$RESULTS/phase1_real_unpad.json"
step phase2_real_unpad 150 "${BENCH[@]}" --seq-len 512 --batch "$BATCH2" --unpad \
  --lengths-from benchmarks/wiki_lengths.json --num-batches 8 --out "$RESULTS/phase2_real_unpad.json"

if [ "$SECONDS" -lt "$BUDGET" ]; then
  step phase1_compile 170 "${BENCH[@]}" --seq-len 128 --batch "$BATCH1" --compile --warmup 3 \
    --out "$RESULTS/phase1_compile.json"
else
  say "== phase1_compile skipped: ${SECONDS}s used (budget ${BUDGET}s)"
fi
if [ "$ON_CUDA" = 0 ]; then
  say "== microbatch skipped: it needs a CUDA device (DEVICE=$DEVICE)"
elif [ "$SECONDS" -lt "$BUDGET" ]; then
  step microbatch 90 "$PY" -m bertscale.bench microbatch --preset "$PRESET" --seq-len 512 \
    --global-batch 256 --start 32 --dtype "$DTYPE" --device "$DEVICE"
else
  say "== microbatch skipped: ${SECONDS}s used (budget ${BUDGET}s)"
fi

say ""
say "== summary (${SECONDS}s)"
if "$PY" - "$RESULTS" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
rows = []
for name in ("phase1", "phase2", "phase1_real_unpad", "phase2_real_unpad", "phase1_compile"):
    f = Path(sys.argv[1]) / f"{name}.json"
    if not f.is_file():
        print(f"{name:19}no result (failed or skipped)")
        continue
    r = json.loads(f.read_text())
    if not rows:
        hf = f"transformers {r['transformers']}" if r["transformers"] else "no transformers"
        print(f"{r['device']}, {r['preset']}, torch {r['torch']}, {hf}, "
              f"{r['precision']}, {r['optimizer']}; matmul peak {r['peak_tflops']:.1f} TFLOP/s")
        print(f"{'run':19}{'impl':14}{'seq/s':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'speedup':>9}")
    rows.append(name)
    for impl in ("bertscale", "transformers"):
        x = r["results"].get(impl)
        if x:
            sp = f"{r['results']['speedup']:.2f}x" if impl == "bertscale" and "speedup" in r["results"] else ""
            print(f"{name:19}{impl:14}{x['seq_per_s']:>9.0f}{x['tokens_per_s']:>11.0f}"
                  f"{x['tflops']:>9.1f}{x['mfu']:>7.1%}{sp:>9}")
    if "transformers" not in r["results"]:
        print(f"{name:19}{'transformers':14}not measured: {r.get('note') or 'no result'}")
PY
then :; else say "!! summary: failed"; FAILED+=(summary); fi
if [ "${#FAILED[@]}" -gt 0 ]; then
  say "gpu_check: finished in ${SECONDS}s; steps that failed or timed out: ${FAILED[*]}"
  exit 2
fi
say "gpu_check: finished in ${SECONDS}s, all steps passed"
