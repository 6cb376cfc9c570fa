#!/usr/bin/env bash
# The first run on one GPU (H100 / H200): is the trainer right there, and how fast is it? Built
# for a machine lent for one command of at most 10 minutes, with no network, whose files come
# back only from one folder: it ends by a hard deadline and packs what it has after every step.
#
#   bash benchmarks/gpu_check.sh                          # from the repository root or anywhere
#   GPU_CHECK_PACK="$OUT" bash benchmarks/gpu_check.sh    # also pack the results into $OUT
#
# Steps, in the order of what we most need to know (each is skipped when the time left before the
# deadline is less than it needs; a step that overruns its limit is killed with every process it
# started):
#   wheels         the offline kit benchmarks/wheels/ (`make gpu-kit`) installed into scratch
#   preflight      names every missing piece at once (Python >= 3.11, torch with CUDA,
#                  deepspeed, tokenizers, numpy; pytest and transformers optional) -> exit 1
#   peak           a matmul peak measured on this GPU in the training dtype
#   data           real English prose shipped with Python (bertscale demo's corpus), a WordPiece
#                  vocabulary, NSP shards at sequence 128
#   pt_zero1_lamb  the REAL `bertscale pretrain` on BERT-Large shapes (vocab 30522, seq 128,
#                  micro-batch BATCH_PT, accumulation 2), ZeRO-1 bf16 LAMB unpadded (what the GPU
#                  recipes run): STEPS_PT steps stopped halfway, resumed, checked; seq/s, MFU on
#                  real tokens (datasheet and measured peak), peak memory (pretrain_case.py)
#   pt_zero2_fp16  the same, ZeRO-2 fp16 AdamW: dynamic loss scaling, skipped updates counted
#   gpu_tests      the GPU-marked tests: the variable-length flash kernel against the
#                  per-sequence path, and the step with no host sync (tests/test_host_syncs.py)
#   pt_zero3       ZeRO-3 bf16 LAMB;  pt_2rank_nccl: ZeRO-1 on 2 ranks (NCCL), with 2+ GPUs
#   phase1 phase2 phase1_real_unpad phase2_real_unpad
#                  the bertscale vs transformers step tables (plain PyTorch steps, autocast):
#                  seq 128 and 512 at full length, then real Wikipedia lengths with unpadding
#   phase1_compile, microbatch   torch.compile and the micro-batch finder, when time is left
#
# Environment:
#   GPU_CHECK_DEADLINE_S  the hard deadline, seconds from the start (default 540: one 10-minute
#                         command with margin); every step's limit is cut to the time left
#   GPU_CHECK_PACK=DIR    after every step: DIR/gpu_check_summary.txt, gpu_check.log and
#                         gpu_check_results.tar.gz (benchmarks/gpu_report.py; no shards, no
#                         checkpoints); each written atomically
#   GPU_CHECK_OUT         working folder (default gpu_check_results/, git-ignored)
#   GPU_CHECK_SKIP / GPU_CHECK_ONLY   "step step ...": leave these out / run only these
#   GPU_CHECK_NEED_S      the least time left for a step to start, for every step (default: each
#                         step's own, sized for the GPU; a dry run on a slow CPU may lower it)
#   GPU_CHECK_LIMIT_SCALE multiplies every step's own limit (a slow machine; the deadline still
#                         cuts it)
#   GPU_CHECK_WHEELS      the kit folder (default benchmarks/wheels)
#   GPU_CHECK_TORCH_EXTENSIONS_DIR   where DeepSpeed JIT-builds ops (default: a fresh folder in
#                         the scratch, so no lock left by a killed build elsewhere can block it)
#   PYTHON                the interpreter (default python3)
# Exit status: 0 when every step that ran passed, 2 when one failed or timed out, 1 when the
# preflight found something missing. Nothing is written outside the working folder and the pack:
# bytecode is off, and temporary files (installed wheels, DeepSpeed's, torch.compile's and
# Triton's caches) go to a scratch folder removed at exit.
#
# CPU dry run of the script itself (tests/test_gpu_check.py): PRESET=tiny DEVICE=cpu DTYPE=fp32;
# there bf16 cases run in fp32 (bf16 is emulated and slow on CPUs) and the fp16 case in fp32 with
# debug.overflow_at_steps forcing skipped updates (DeepSpeed refuses fp16 on a CPU), and the
# 2-rank case runs on gloo when GPU_CHECK_2RANK=1.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Relative paths given by the caller are relative to where the script was started, not $ROOT.
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
PY="${PYTHON:-python3}"
case "$PY" in */*) PY="$(abspath "$PY")" ;; esac
RESULTS="$(abspath "${GPU_CHECK_OUT:-$ROOT/gpu_check_results}")"
WHEELS="$(abspath "${GPU_CHECK_WHEELS:-$ROOT/benchmarks/wheels}")"
PACK="${GPU_CHECK_PACK:+$(abspath "$GPU_CHECK_PACK")}"
cd "$ROOT"
DEADLINE="${GPU_CHECK_DEADLINE_S:-540}"
RESERVE=15   # seconds kept for the last kill, the summary and the last pack
# Overridable for a dry run of the script itself on a CPU (e.g. PRESET=tiny DEVICE=cpu DTYPE=fp32).
PRESET="${PRESET:-large}" DEVICE="${DEVICE:-cuda}" DTYPE="${DTYPE:-bf16}"
BATCH1="${BATCH1:-128}" BATCH2="${BATCH2:-32}" REPEATS="${REPEATS:-6}"
PEAK_N="${PEAK_N:-}"   # size of the peak-measuring matmul; default by device (8192 on CUDA)
BATCH_PT="${BATCH_PT:-64}" STEPS_PT="${STEPS_PT:-40}" LOG_PT="${LOG_PT:-5}"
COMPILE_BACKEND="${COMPILE_BACKEND:-inductor}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
STEPS_TSV="$RESULTS/steps.tsv"
: > "$LOG"
: > "$STEPS_TSV"
RUNS=(phase1 phase2 phase1_real_unpad phase2_real_unpad phase1_compile)
CASES=(pt_zero1_lamb pt_zero2_fp16 pt_zero3 pt_2rank_nccl)
for run in "${RUNS[@]}" "${CASES[@]}"; do rm -f "$RESULTS/$run.json"; done  # a stale one would pass as new
rm -rf "$RESULTS/pretrain" "$RESULTS/peak.txt"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 WANDB_MODE=disabled
export TMPDIR="$SCRATCH" TORCHINDUCTOR_CACHE_DIR="$SCRATCH/inductor"
export TRITON_CACHE_DIR="$SCRATCH/triton" CUDA_CACHE_PATH="$SCRATCH/nv"
export TORCH_EXTENSIONS_DIR="${GPU_CHECK_TORCH_EXTENSIONS_DIR:-$SCRATCH/torch_extensions}"
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ON_CUDA=0
case "$DEVICE" in cuda*) ON_CUDA=1 ;; *) export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" ;; esac

NAME=gpu_check
source "$ROOT/benchmarks/gpu_lib.sh"

say "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT, deadline ${DEADLINE}s"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$LOG"

if ! command -v "$PY" >/dev/null 2>&1 && [ ! -x "$PY" ]; then
  say "gpu_check: missing: $PY (set PYTHON=/path/to/python3.11+)"
  exit 1
fi
install_kit "$WHEELS"

# ---- preflight: every missing piece named at once; only the optional ones let the check go on.
CUDA_FLAG=(); [ "$ON_CUDA" = 1 ] && CUDA_FLAG=(--cuda)
preflight ${CUDA_FLAG[@]+"${CUDA_FLAG[@]}"} --need "torch=the trainer and the benchmarks" \
  --need "deepspeed=the trainer; \`make gpu-kit\` packs it for a machine without network" \
  --need "tokenizers=the data step and the trainer" --need "numpy=the shards" \
  --optional "pytest=the GPU tests step" \
  --optional "transformers=the comparison table; bertscale runs alone without it"
HAVE_PYTEST=0; "$PY" -c 'import pytest' 2>/dev/null && HAVE_PYTEST=1
NGPU=0
[ "$ON_CUDA" = 1 ] && NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"

step peak 60 15 "$PY" -m bertscale.commands.perf --device "$DEVICE" --dtype "$DTYPE" ${PEAK_N:+--n "$PEAK_N"}
# The measured peak (TFLOP/s) for the pretrain cases' second MFU.
PEAK_TFLOPS="$(sed -n 's/^matmul peak on .*: \([0-9.]*\) TFLOP\/s$/\1/p' "$LOG" | tail -n 1)"

# ---- data: real prose shipped with Python, a WordPiece vocabulary, NSP shards at seq 128
DATA='
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
documents = stats["documents"]
print(f"data: {documents} documents -> {manifest} in {time.monotonic() - t0:.0f}s")'
step data 150 30 "$PY" -c "$DATA" "$RESULTS/pretrain/data"
MANIFEST="$RESULTS/pretrain/data/shards/seq128/manifest.json"

# ---- the real trainer: BERT-Large shapes (the vocabulary set to BERT's 30522), seq 128
if [ "$DTYPE" = bf16 ]; then BF=bf16; else BF=fp32; fi   # the dry run trains in fp32
if [ "$ON_CUDA" = 1 ]; then FP16=(zero2_fp16); else FP16=(zero2_fp32 "debug.overflow_at_steps=[2,3]"); fi
CASE=("$PY" benchmarks/pretrain_case.py --manifest "$MANIFEST" --out "$RESULTS"
      --steps "$STEPS_PT" --log-every "$LOG_PT" ${PEAK_TFLOPS:+--peak-tflops "$PEAK_TFLOPS"}
      --set "model.preset=\"$PRESET\"" --set model.vocab_size=30522
      --set "train.micro_batch_size=$BATCH_PT" --set "train.global_batch_size=$((2 * BATCH_PT))"
      --set eval.every=0 --set eval.at_start=false
      --set eval.samples=64 --set logging.progress=\"plain\"
      --set logging.wandb=false --set logging.peak_tflops=0 --set optimizer.lr=1e-3)
pt_case() {  # NAME ARGS...: one case, its checkpoints gone afterwards (GBs for BERT-Large)
  local name="$1"; shift
  step "$name" 240 90 "${CASE[@]}" --name "$name" "$@"
  rm -rf "$RESULTS/pretrain/run_$name/checkpoints"
}
HAVE_DATA=0; [ -f "$MANIFEST" ] && HAVE_DATA=1
if [ "$HAVE_DATA" = 1 ]; then
  pt_case pt_zero1_lamb --set "train.deepspeed=\"zero1_$BF\"" --set fast.unpad=true
  pt_case pt_zero2_fp16 --set "train.deepspeed=\"${FP16[0]}\"" \
    --set optimizer.name=\"adamw\" --set optimizer.lr=1e-4 ${FP16[1]:+--set "${FP16[1]}"}
else
  say "!! pretrain cases: no shards ($MANIFEST), the data step failed or was skipped"
  FAILED+=(pretrain); record pretrain failed 0 - "no shards"
fi

# Correctness on the GPU: the flash kernel's parity, and the step with no host sync.
if [ "$HAVE_PYTEST" = 1 ]; then
  BERTSCALE_PROSE_MANIFEST="$( [ "$HAVE_DATA" = 1 ] && echo "$MANIFEST" )" \
  step gpu_tests 180 45 "$PY" -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_fastpaths.py tests/test_host_syncs.py
else
  say "== gpu_tests skipped: pytest is missing (see preflight)"; FAILED+=(gpu_tests)
  record gpu_tests failed 0 - "no pytest"
fi

if [ "$HAVE_DATA" = 1 ]; then
  pt_case pt_zero3 --set "train.deepspeed=\"zero3_$BF\""
  if [ "$NGPU" -ge 2 ] || [ "${GPU_CHECK_2RANK:-0}" = 1 ]; then
    pt_case pt_2rank_nccl --nproc 2 --set "train.deepspeed=\"zero1_$BF\"" --set fast.unpad=true \
      --set "train.global_batch_size=$((4 * BATCH_PT))"
  else
    say "== pt_2rank_nccl skipped: it needs 2+ GPUs ($NGPU visible)"
  fi
fi

BENCH=("$PY" -m bertscale.cli bench model --preset "$PRESET" --dtype "$DTYPE" --device "$DEVICE"
       --optimizer-impl fused --warmup 2 --repeats "$REPEATS" --steps 3
       ${PEAK_N:+--peak-n "$PEAK_N"})
step phase1 150 45 "${BENCH[@]}" --seq-len 128 --batch "$BATCH1" --out "$RESULTS/phase1.json"
step phase2 150 45 "${BENCH[@]}" --seq-len 512 --batch "$BATCH2" --out "$RESULTS/phase2.json"
step phase1_real_unpad 150 45 "${BENCH[@]}" --seq-len 128 --batch "$BATCH1" --unpad \
  --lengths-from benchmarks/wiki_lengths.json --num-batches 8 --out "$RESULTS/phase1_real_unpad.json"
step phase2_real_unpad 150 45 "${BENCH[@]}" --seq-len 512 --batch "$BATCH2" --unpad \
  --lengths-from benchmarks/wiki_lengths.json --num-batches 8 --out "$RESULTS/phase2_real_unpad.json"

# Only while time is left (their NEED is most of what they take).
step phase1_compile 200 120 "${BENCH[@]}" --seq-len 128 --batch "$BATCH1" --compile --warmup 3 \
  --compile-backend "$COMPILE_BACKEND" --out "$RESULTS/phase1_compile.json"
# A compile that fell back to eager measured eager: a failure of this step, said as such.
if [ -f "$RESULTS/phase1_compile.json" ] && ! "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); sys.exit(3 if r.get("compile_error") else 0)' "$RESULTS/phase1_compile.json"; then
  say "!! phase1_compile: torch.compile failed and bertscale ran eager (see the summary)"
  FAILED+=(phase1_compile)
fi
if [ "$ON_CUDA" = 1 ]; then
  step microbatch 90 60 "$PY" -m bertscale.cli bench microbatch --preset "$PRESET" --seq-len 512 \
    --global-batch 256 --start 32 --dtype "$DTYPE" --device "$DEVICE"
else
  say "== microbatch skipped: it needs a CUDA device (DEVICE=$DEVICE)"
fi

say ""
say "== summary (t=${SECONDS}s of ${DEADLINE}s)"
"$PY" "$ROOT/benchmarks/gpu_report.py" summary "$RESULTS" 2>&1 | tee -a "$LOG" \
  || { say "!! summary: failed"; FAILED+=(summary); }
[ "${#LATE[@]}" -eq 0 ] || say "gpu_check: not started before the deadline: ${LATE[*]}"
if [ "${#FAILED[@]}" -gt 0 ]; then
  say "gpu_check: finished in ${SECONDS}s; steps that failed or timed out: ${FAILED[*]}"
  exit 2
fi
say "gpu_check: finished in ${SECONDS}s, all steps that ran passed"
