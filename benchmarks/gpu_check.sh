#!/usr/bin/env bash
# The first run on one GPU (H100 / H200), in about 5 minutes: is the trainer right, and how fast?
#   1. preflight: names every missing piece (Python >= 3.11, torch with CUDA, deepspeed,
#      tokenizers, pytest for the kernel parity test, transformers for the comparison table)
#   2. parity: the variable-length flash kernel against the per-sequence path (pytest)
#   3. peak: a matmul peak measured on this GPU in the training dtype
#   4. data: real English prose shipped with Python (bertscale demo's corpus), a WordPiece
#      vocabulary, NSP shards at sequence 128
#   5. the REAL `bertscale pretrain` on BERT-Large shapes (vocab 30522, seq 128, micro-batch
#      BATCH_PT, accumulation 2), each case stopped halfway, resumed, and checked (the resumed
#      loss continues the curve; every step logged once; the data position counts everything):
#        pt_zero1_lamb   ZeRO-1 bf16 LAMB, unpadded (what the GPU recipes run)
#        pt_zero2_fp16   ZeRO-2 fp16 AdamW (dynamic loss scaling: its skipped updates counted)
#        pt_zero3        ZeRO-3 bf16 LAMB
#        pt_2rank_nccl   ZeRO-1 bf16 LAMB on 2 ranks (NCCL), only with 2+ GPUs
#      each reports seq/s, TFLOP/s, MFU against the datasheet peak and the measured matmul peak,
#      skipped updates and peak memory
#   6. the bertscale vs Hugging Face transformers step table (plain PyTorch steps with autocast,
#      both models alike): phase 1 (seq 128) and phase 2 (seq 512) on full-length batches, then
#      real Wikipedia lengths (benchmarks/wiki_lengths.json) with bertscale's unpadding; then a
#      torch.compile variant (a compile that fell back to eager is reported as a failure, never as
#      compiled) and the micro-batch finder, while the budget lasts.
#
#   bash benchmarks/gpu_check.sh            # from the repository root or anywhere
#   GPU_CHECK_OUT=dir PYTHON=python3 bash benchmarks/gpu_check.sh
#
# Each step has its own time limit; a failed step is reported and the next runs; the summary at
# the end shows whatever finished. Steps marked optional start only while under
# GPU_CHECK_BUDGET_S seconds (default 270). Python wheels in benchmarks/wheels/ (or
# $GPU_CHECK_WHEELS) are installed offline into a temporary folder first, for machines with no
# package index.
# Exit status: 0 when every step passed, 2 when a step failed or timed out, 1 when something the
# check needs is missing (preflight). Nothing is written outside the results folder: Python's
# bytecode is off, and temporary files (installed wheels, torch.compile's and Triton's caches)
# go to a scratch folder removed at exit.
#
# GPU_CHECK_SKIP="step step ..." leaves those steps out; GPU_CHECK_LIMIT_SCALE=N multiplies
# every step's limit (a slow or shared machine).
# CPU dry run of the script itself (tests/test_gpu_check.py): PRESET=tiny DEVICE=cpu DTYPE=fp32;
# there bf16 cases run in fp32 (bf16 is emulated and slow on CPUs) and the fp16 case in fp32 with
# debug.overflow_at_steps forcing skipped updates (DeepSpeed refuses fp16 on a CPU), and the
# 2-rank case runs on gloo when GPU_CHECK_2RANK=1.
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
BATCH_PT="${BATCH_PT:-64}" STEPS_PT="${STEPS_PT:-24}"   # the pretrain cases: micro-batch, steps
COMPILE_BACKEND="${COMPILE_BACKEND:-inductor}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
: > "$LOG"
RUNS=(phase1 phase2 phase1_real_unpad phase2_real_unpad phase1_compile)
CASES=(pt_zero1_lamb pt_zero2_fp16 pt_zero3 pt_2rank_nccl)
for run in "${RUNS[@]}" "${CASES[@]}"; do rm -f "$RESULTS/$run.json"; done  # a stale one would pass as new
rm -rf "$RESULTS/pretrain" "$RESULTS/peak.txt"
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
  local name="$1" limit="$(( $2 * ${GPU_CHECK_LIMIT_SCALE:-1} ))"; shift 2
  say ""
  case " ${GPU_CHECK_SKIP:-} " in *" $name "*) say "== $name skipped (GPU_CHECK_SKIP)"; return 0 ;; esac
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
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee -a "$LOG" || true

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE="$SCRATCH/site"
  step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi

# ---- preflight: every missing piece named at once; only the optional ones let the check go on.
say ""
say "== preflight (t=${SECONDS}s)"
if ! command -v "$PY" >/dev/null 2>&1 && [ ! -x "$PY" ]; then
  say "gpu_check: missing: $PY (set PYTHON=/path/to/python3.11+)"
  exit 1
fi
PREFLIGHT_RC=0
ON_CUDA=$ON_CUDA "$PY" - <<'PY' 2>&1 | tee -a "$LOG" || PREFLIGHT_RC=$?
import importlib, os, sys
missing, optional, have = [], [], []
if sys.version_info < (3, 11):
    missing.append(f"Python >= 3.11 (this is {sys.version.split()[0]}; bertscale reads recipes with tomllib)")
else:
    have.append(f"Python {sys.version.split()[0]}")
def probe(name, why, needed=True):
    try:
        mod = importlib.import_module(name)
        have.append(f"{name} {getattr(mod, '__version__', '')}".strip())
        return mod
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        (missing if needed else optional).append(f"{name} ({why}; {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
torch = probe("torch", "the trainer and the benchmarks")
probe("deepspeed", "the trainer")
probe("tokenizers", "the data step and the trainer's shards")
probe("webdataset", "the shards")
probe("numpy", "the shards")
probe("pytest", "the flash-kernel parity step", needed=False)
probe("transformers", "the comparison table; bertscale's side runs alone without it", needed=False)
if torch is not None and os.environ.get("ON_CUDA") == "1":
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no usable GPU"
        missing.append(f"a CUDA GPU usable by torch (torch {torch.__version__} is {build})")
    else:
        have.append(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
print("preflight: have " + ", ".join(have))
for m in optional:
    print(f"preflight: optional, missing: {m}")
for m in missing:
    print(f"preflight: MISSING: {m}")
sys.exit(1 if missing else 0)
PY
if [ "$PREFLIGHT_RC" -ne 0 ]; then
  say "gpu_check: preflight found missing pieces (above); nothing measured"
  exit 1
fi
HAVE_PYTEST=0; "$PY" -c 'import pytest' 2>/dev/null && HAVE_PYTEST=1
NGPU=0
[ "$ON_CUDA" = 1 ] && NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"

# Correctness first: the variable-length flash kernel against the per-sequence path.
if [ "$HAVE_PYTEST" = 1 ]; then
  step parity 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_fastpaths.py -k cuda
else
  say "== parity skipped: pytest is missing (see preflight)"; FAILED+=(parity)
fi

step peak 60 "$PY" -m bertscale.perf --device "$DEVICE" --dtype "$DTYPE" ${PEAK_N:+--n "$PEAK_N"}
# The measured peak (TFLOP/s) for the pretrain cases' second MFU.
PEAK_TFLOPS="$(sed -n 's/^matmul peak on .*: \([0-9.]*\) TFLOP\/s$/\1/p' "$LOG" | tail -n 1)"

# ---- data: real prose shipped with Python, a WordPiece vocabulary, NSP shards at seq 128
step data 120 "$PY" - "$RESULTS/pretrain/data" <<'PY'
import sys, time
from pathlib import Path
from bertscale.data.prepare import PrepareConfig, run_prepare
from bertscale.demo import write_corpus
from bertscale.tokenizer import train_wordpiece
t0 = time.monotonic()
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
corpus = out / "python_docs.txt"
stats = write_corpus(corpus)
vocab = out.parent / "vocab.txt"
train_wordpiece(lambda: (p for p in corpus.read_text(encoding="utf-8").splitlines() if p), vocab,
                vocab_size=8000, lowercase=True)
manifest = run_prepare(PrepareConfig(inputs=[str(corpus)], out=out / "shards", vocab=vocab,
                                     lowercase=True, seq_lens=[128], dupe_factor=2,
                                     samples_per_shard=2000, eval_fraction=0.05, seed=12345,
                                     progress="none"))[128]
print(f"data: {stats['documents']} documents -> {manifest} in {time.monotonic() - t0:.0f}s")
PY
MANIFEST="$RESULTS/pretrain/data/shards/seq128/manifest.json"

# ---- the real trainer: BERT-Large shapes (the vocabulary set to BERT's 30522), seq 128
if [ "$DTYPE" = bf16 ]; then BF=bf16; else BF=fp32; fi   # the dry run trains in fp32
if [ "$ON_CUDA" = 1 ]; then FP16=(zero2_fp16); else FP16=(zero2_fp32 "debug.overflow_at_steps=[2,3]"); fi
CASE=("$PY" benchmarks/pretrain_case.py --manifest "$MANIFEST" --out "$RESULTS"
      --steps "$STEPS_PT" ${PEAK_TFLOPS:+--peak-tflops "$PEAK_TFLOPS"}
      --set "model.preset=\"$PRESET\"" --set model.vocab_size=30522
      --set "train.micro_batch_size=$BATCH_PT" --set "train.global_batch_size=$((2 * BATCH_PT))"
      --set checkpoint.every=0 --set eval.every=0 --set eval.at_start=false
      --set eval.samples=64 --set logging.every=1 --set logging.progress=\"plain\"
      --set logging.wandb=false --set logging.peak_tflops=0 --set optimizer.lr=1e-3)
if [ -f "$MANIFEST" ]; then
  step pt_zero1_lamb 150 "${CASE[@]}" --name pt_zero1_lamb --set "train.deepspeed=\"zero1_$BF\"" \
    --set fast.unpad=true
  step pt_zero2_fp16 150 "${CASE[@]}" --name pt_zero2_fp16 --set "train.deepspeed=\"${FP16[0]}\"" \
    --set optimizer.name=\"adamw\" --set optimizer.lr=1e-4 ${FP16[1]:+--set "${FP16[1]}"}
  step pt_zero3 150 "${CASE[@]}" --name pt_zero3 --set "train.deepspeed=\"zero3_$BF\""
  if [ "$NGPU" -ge 2 ] || [ "${GPU_CHECK_2RANK:-0}" = 1 ]; then
    step pt_2rank_nccl 150 "${CASE[@]}" --name pt_2rank_nccl --nproc 2 \
      --set "train.deepspeed=\"zero1_$BF\"" --set fast.unpad=true \
      --set "train.global_batch_size=$((4 * BATCH_PT))"
  else
    say "== pt_2rank_nccl skipped: it needs 2+ GPUs ($NGPU visible)"
  fi
else
  say "!! pretrain cases: no shards ($MANIFEST), the data step failed"
  FAILED+=(pretrain)
fi
rm -rf "$RESULTS"/pretrain/run_*/checkpoints   # GBs per BERT-Large case; the metrics stay

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
    --compile-backend "$COMPILE_BACKEND" --out "$RESULTS/phase1_compile.json"
  # A compile that fell back to eager measured eager: a failure of this step, said as such.
  if [ -f "$RESULTS/phase1_compile.json" ] && ! "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); sys.exit(3 if r.get("compile_error") else 0)' "$RESULTS/phase1_compile.json"; then
    say "!! phase1_compile: torch.compile failed and bertscale ran eager (see the summary)"
    FAILED+=(phase1_compile)
  fi
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
def pct(x):
    return f"{x:.1%}" if x is not None else "n/a"
print("bertscale pretrain (DeepSpeed, seq 128; medians after warm-up; MFU against the datasheet "
      "peak and the measured matmul peak)")
print(f"{'case':19}{'seq/s':>9}{'TFLOP/s':>9}{'MFU sheet':>11}{'MFU meas':>10}{'skips':>7}"
      f"{'peak GiB':>10}  resume")
for name in ("pt_zero1_lamb", "pt_zero2_fp16", "pt_zero3", "pt_2rank_nccl"):
    f = Path(sys.argv[1]) / f"{name}.json"
    if not f.is_file():
        print(f"{name:19}no result (failed or skipped)")
        continue
    r = json.loads(f.read_text())
    mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
    resume = ("ok" if not r["problems"] else "FAILED") + (
        f" (step {r['resumed_at']}, drift {r['resume_drift']:.1%})" if r["resume_drift"] is not None else "")
    print(f"{name:19}{r['seq_per_s']:>9.0f}{r['tflops']:>9.1f}{pct(r['mfu_datasheet']):>11}"
          f"{pct(r['mfu_measured']):>10}{r['skipped_updates']:>7}{mem:>10}  {resume}")
print()
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
    if r.get("compile_error"):
        print(f"{name:19}torch.compile FAILED, bertscale ran eager: {r['compile_error']}")
    elif r["fast_paths"].get("compile"):
        print(f"{name:19}compiled ({r.get('compile_backend') or 'inductor'})")
if rows and json.loads((Path(sys.argv[1]) / f"{rows[0]}.json").read_text()).get("datasheet_tflops"):
    r = json.loads((Path(sys.argv[1]) / f"{rows[0]}.json").read_text())
    print(f"MFU above is against the measured matmul peak; the datasheet's is "
          f"{r['datasheet_tflops']:g} TFLOP/s ({r['datasheet_source']})")
PY
then :; else say "!! summary: failed"; FAILED+=(summary); fi
if [ "${#FAILED[@]}" -gt 0 ]; then
  say "gpu_check: finished in ${SECONDS}s; steps that failed or timed out: ${FAILED[*]}"
  exit 2
fi
say "gpu_check: finished in ${SECONDS}s, all steps passed"
