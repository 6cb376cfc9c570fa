#!/usr/bin/env bash
# The quality stage on one GPU, for when a check has time left or a second command is possible:
# `bertscale bench quality` (bertscale/bench/quality/, the same pipeline as on the CPU) on the
# real Wikipedia sample and GLUE tasks that travel with the checkout (`make gpu-data` copies them
# into benchmarks/data/, git-ignored). It pretrains BERT-Mini (GPU_QUALITY_PRESET=small:
# BERT-Small) with bertscale and, on the same batches for the same wall-clock, with
# `transformers`, for a budget sized to the deadline; then fine-tunes both and a random-initialised
# twin on CoLA, MRPC, RTE and STS-B over 3 seeds, and reports the table `bench quality` reports.
#
#   bash benchmarks/gpu_quality.sh
#   GPU_QUALITY_PACK="$OUT" bash benchmarks/gpu_quality.sh      # packs into $OUT
#
# Environment:
#   GPU_QUALITY_DEADLINE_S  hard deadline, seconds from the start (default 540)
#   GPU_QUALITY_BUDGET_MIN  pretraining minutes per side (default: what the deadline leaves after
#                           GPU_QUALITY_OVERHEAD_S (default 300: prepare, calibration, exports,
#                           15 fine-tuning runs per model), split between the two sides; >= 0.5)
#   GPU_QUALITY_PACK=DIR    DIR/gpu_quality_summary.txt, gpu_quality.log and
#                           gpu_quality_results.tar.gz after every step (beside gpu_check's)
#   GPU_QUALITY_OUT         working folder (default gpu_quality_results/, git-ignored)
#   GPU_QUALITY_DATA        the folder `make gpu-data` fills (default benchmarks/data): wikipedia/,
#                           glue/<Task>/, vocab/bert-base-uncased-vocab.txt
#   GPU_QUALITY_TASKS, GPU_QUALITY_SEEDS, GPU_QUALITY_PRESET   (CoLA,MRPC,RTE,STS-B; 1,2,3; mini)
#   GPU_QUALITY_ARGS        more `bench quality` arguments (the CPU dry run's toy sizes)
#   GPU_CHECK_WHEELS, PYTHON   as for gpu_check.sh
# Exit status: 0 when it finished, 2 when the stage failed or ran out of time (the stages that
# finished are in the pack), 1 when the preflight found something missing.
#
# CPU dry run at toy size (tests/test_gpu_check.py): DEVICE=cpu with a one-file corpus and
# GPU_QUALITY_ARGS shrinking the model, the batches and the fine-tuning sets.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
PY="${PYTHON:-python3}"
case "$PY" in */*) PY="$(abspath "$PY")" ;; esac
RESULTS="$(abspath "${GPU_QUALITY_OUT:-$ROOT/gpu_quality_results}")"
WHEELS="$(abspath "${GPU_CHECK_WHEELS:-$ROOT/benchmarks/wheels}")"
DATA="$(abspath "${GPU_QUALITY_DATA:-$ROOT/benchmarks/data}")"
PACK="${GPU_QUALITY_PACK:+$(abspath "$GPU_QUALITY_PACK")}"
cd "$ROOT"
DEADLINE="${GPU_QUALITY_DEADLINE_S:-540}"
RESERVE=15
OVERHEAD="${GPU_QUALITY_OVERHEAD_S:-300}"
TASKS="${GPU_QUALITY_TASKS:-CoLA,MRPC,RTE,STS-B}" SEEDS="${GPU_QUALITY_SEEDS:-1,2,3}"
PRESET="${GPU_QUALITY_PRESET:-mini}"
DEVICE="${DEVICE:-cuda}"
rm -rf "$RESULTS"   # bench quality resumes a folder with the same settings; a new run starts clean
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_quality.log"
STEPS_TSV="$RESULTS/steps.tsv"
: > "$LOG"
: > "$STEPS_TSV"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu_quality.XXXXXX")"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 WANDB_MODE=disabled
export TMPDIR="$SCRATCH" TORCHINDUCTOR_CACHE_DIR="$SCRATCH/inductor" TRITON_CACHE_DIR="$SCRATCH/triton"
export TORCH_EXTENSIONS_DIR="${GPU_CHECK_TORCH_EXTENSIONS_DIR:-$SCRATCH/torch_extensions}"
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MPLCONFIGDIR="$SCRATCH/mpl"
ON_CUDA=0
case "$DEVICE" in cuda*) ON_CUDA=1 ;; *) export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" ;; esac
# `bench quality` runs the `bertscale` command; from a checkout that is this module.
mkdir -p "$SCRATCH/bin"
printf '#!/bin/sh\nexec "%s" -m bertscale "$@"\n' "$PY" > "$SCRATCH/bin/bertscale"
chmod +x "$SCRATCH/bin/bertscale"
export PATH="$SCRATCH/bin:$PATH"

NAME=gpu_quality
source "$ROOT/benchmarks/gpu_lib.sh"

say "gpu_quality: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT, deadline ${DEADLINE}s, data $DATA"
if ! command -v "$PY" >/dev/null 2>&1 && [ ! -x "$PY" ]; then
  say "gpu_quality: missing: $PY (set PYTHON=/path/to/python3.11+)"
  exit 1
fi
install_kit "$WHEELS"
GLUE_NEEDS=()
IFS=, read -ra TASK_LIST <<< "$TASKS"
for t in "${TASK_LIST[@]}"; do
  GLUE_NEEDS+=(--path "$DATA/glue/$t/train.tsv=GLUE $t; \`make gpu-data\` copies it into benchmarks/data")
done
CUDA_FLAG=(); [ "$ON_CUDA" = 1 ] && CUDA_FLAG=(--cuda)
preflight ${CUDA_FLAG[@]+"${CUDA_FLAG[@]}"} --need "torch=the trainer" \
  --need "deepspeed=the trainer; \`make gpu-kit\` packs it for a machine without network" \
  --need "tokenizers=prepare" --need "transformers=the comparison side (c)" \
  --path "$DATA/wikipedia=the Wikipedia sample; \`make gpu-data\` copies it into benchmarks/data" \
  --path "$DATA/vocab/bert-base-uncased-vocab.txt=the WordPiece vocabulary; \`make gpu-data\`" \
  "${GLUE_NEEDS[@]}"

# The pretraining budget per side: what the deadline leaves after the rest, in two.
BUDGET="${GPU_QUALITY_BUDGET_MIN:-$(awk -v l="$(left)" -v o="$OVERHEAD" \
  'BEGIN { b = (l - o) / 120; if (b < 0.5) b = 0.5; printf "%.1f", b }')}"
say "gpu_quality: pretraining budget ${BUDGET} min per side (bertscale, transformers)"
NPROC="$(nproc 2>/dev/null || echo 2)"
# shellcheck disable=SC2086  # GPU_QUALITY_ARGS is a list of arguments
step quality 100000 60 "$PY" -m bertscale bench quality --data "$DATA/wikipedia" \
  --glue "$DATA/glue" --vocab "$DATA/vocab/bert-base-uncased-vocab.txt" \
  --out "$RESULTS/quality" --budget-min "$BUDGET" --evals 5 --tasks "$TASKS" --seeds "$SEEDS" \
  --prepare-workers "$NPROC" --set "model.preset=\"$PRESET\"" ${GPU_QUALITY_ARGS:-}
[ -f "$RESULTS/quality/results.json" ] && cp "$RESULTS/quality/results.json" "$RESULTS/quality.json"

say ""
say "== summary (t=${SECONDS}s of ${DEADLINE}s)"
"$PY" "$ROOT/benchmarks/gpu_report.py" summary "$RESULTS" 2>&1 | tee -a "$LOG"
if [ "${#FAILED[@]}" -gt 0 ] || [ "${#LATE[@]}" -gt 0 ]; then
  say "gpu_quality: finished in ${SECONDS}s without its table (${FAILED[*]} ${LATE[*]}); the stages that finished are packed"
  exit 2
fi
say "gpu_quality: finished in ${SECONDS}s"
