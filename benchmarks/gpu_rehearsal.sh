#!/usr/bin/env bash
# A rehearsal of the one-GPU machine on a CPU machine, before spending device time (not run in CI:
# it downloads the device image's packages, ~5 GB with torch's CUDA libraries, once).
#
#   bash benchmarks/gpu_rehearsal.sh            # from the repository root or anywhere
#
# 1. An environment like the device's image (benchmarks/README.md, "GPU"): CPython 3.12 (from
#    REHEARSAL_PYTHON, else python3.12 on PATH or pyenv's newest 3.12) with the image's packages at
#    its versions and nothing else: torch 2.11.0 (PyPI's build is the CUDA 13.0 one, as on the
#    device; here it runs on the CPU), transformers 5.17.0, tokenizers 0.23, numpy 2.5, pytest,
#    mpi4py, psutil, py-cpuinfo, msgpack, einops, ninja, packaging, tqdm, pyyaml, fsspec. What pip
#    pulls in that the image lacks (pydantic and its parts come with transformers' typer) is
#    removed again. Kept at REHEARSAL_ENV (default ~/.cache/bertscale/device-py312) between runs.
# 2. The kit (`make gpu-kit`), unless benchmarks/wheels/ already holds it.
# 3. A copy of the checkout as the device tool makes one: tracked files and untracked ones git
#    does not ignore, plus the carried ignored folders (benchmarks/wheels, benchmarks/data).
# 4. In that copy, with that interpreter and no PYTHONPATH, the CPU dry run of the device
#    command: GPU_CHECK_PACK=<out> bash benchmarks/gpu_check.sh (PRESET=tiny DEVICE=cpu
#    DTYPE=fp32, small batches, the 2-rank case on gloo, deadline REHEARSAL_DEADLINE_S, default
#    900); then what came back is listed. REHEARSAL_QUALITY=1 also runs gpu_quality.sh at toy
#    size (needs benchmarks/data: `make gpu-data`).
# Exit status: gpu_check.sh's (then gpu_quality.sh's).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="${REHEARSAL_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/bertscale/device-py312}"
DEADLINE="${REHEARSAL_DEADLINE_S:-900}"
IMAGE=(torch==2.11.0 transformers==5.17.0 "tokenizers==0.23.*" "numpy==2.5.*" pytest mpi4py
       psutil py-cpuinfo msgpack einops ninja packaging tqdm pyyaml fsspec)
NOT_IN_IMAGE=(deepspeed hjson pydantic pydantic-core annotated-types typing-inspection
              webdataset braceexpand wandb)

find_python() {
  if [ -n "${REHEARSAL_PYTHON:-}" ]; then echo "$REHEARSAL_PYTHON"; return; fi
  if command -v python3.12 >/dev/null && python3.12 -c 'import venv' 2>/dev/null; then
    command -v python3.12; return
  fi
  local p
  p="$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V | tail -n 1)"
  [ -n "$p" ] && { echo "$p"; return; }
  echo "rehearsal: no Python 3.12 (set REHEARSAL_PYTHON)" >&2; return 1
}

STAMP="$ENV_DIR/.rehearsal-$(echo "${IMAGE[*]}" | cksum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ]; then
  PY312="$(find_python)"
  echo "rehearsal: building $ENV_DIR from $PY312 ($("$PY312" --version))"
  rm -rf "$ENV_DIR"
  "$PY312" -m venv "$ENV_DIR"
  "$ENV_DIR/bin/python" -m pip install -q --upgrade pip
  "$ENV_DIR/bin/python" -m pip install -q "${IMAGE[@]}"
  "$ENV_DIR/bin/python" -m pip uninstall -q -y "${NOT_IN_IMAGE[@]}" 2>/dev/null || true
  touch "$STAMP"
fi
PY="$ENV_DIR/bin/python"
echo "rehearsal: $("$PY" --version), $("$PY" -c 'import torch, transformers, tokenizers, numpy
print(f"torch {torch.__version__} (CUDA available: {torch.cuda.is_available()}), transformers "
      f"{transformers.__version__}, tokenizers {tokenizers.__version__}, numpy {numpy.__version__}")')"
for pkg in "${NOT_IN_IMAGE[@]}"; do
  if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then
    echo "rehearsal: $pkg is installed in $ENV_DIR, unlike the device's image" >&2; exit 1
  fi
done
echo "rehearsal: as on the device, none of: ${NOT_IN_IMAGE[*]}"

compgen -G "$ROOT/benchmarks/wheels/deepspeed-*.whl" >/dev/null || make -C "$ROOT" gpu-kit

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_rehearsal.XXXXXX")"
COPY="$WORK/checkout" OUT="$WORK/out"
mkdir -p "$COPY" "$OUT"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents -P {} "$COPY/")
for carried in benchmarks/wheels benchmarks/data; do
  [ -d "$ROOT/$carried" ] && cp -r "$ROOT/$carried" "$COPY/$carried"
done
echo "rehearsal: checkout copied to $COPY ($(du -sh "$COPY" | cut -f1), the carried folders included)"

cd "$COPY"
echo "rehearsal: the device command's CPU dry run, deadline ${DEADLINE}s"
rc=0
env -u PYTHONPATH -u VIRTUAL_ENV PATH="$ENV_DIR/bin:$PATH" PYTHON="$PY" OUT="$OUT" \
  PRESET=tiny DEVICE=cpu DTYPE=fp32 BATCH1=4 BATCH2=2 REPEATS=2 PEAK_N=512 BATCH_PT=4 STEPS_PT=4 \
  GPU_CHECK_2RANK=1 GPU_CHECK_DEADLINE_S="$DEADLINE" GPU_CHECK_NEED_S=30 GPU_CHECK_SKIP=phase1_compile \
  GPU_CHECK_PACK="$OUT" bash benchmarks/gpu_check.sh || rc=$?
if [ "${REHEARSAL_QUALITY:-0}" = 1 ] && [ "$rc" -eq 0 ]; then
  mkdir -p "$WORK/toy/wikipedia"
  cp "$COPY/benchmarks/data/wikipedia/wiki_00.gz" "$WORK/toy/wikipedia/"
  ln -s "$COPY/benchmarks/data/glue" "$COPY/benchmarks/data/vocab" "$WORK/toy/"
  env -u PYTHONPATH -u VIRTUAL_ENV PYTHON="$PY" DEVICE=cpu GPU_QUALITY_DATA="$WORK/toy" \
    GPU_QUALITY_PACK="$OUT" GPU_QUALITY_TASKS=RTE GPU_QUALITY_SEEDS=1 GPU_QUALITY_PRESET=tiny \
    GPU_QUALITY_BUDGET_MIN=0.05 GPU_QUALITY_ARGS="--set train.global_batch_size=16 --set \
train.micro_batch_size=8 --calibrate-steps 3 --evals 2 --eval-samples 16 --epochs 1 \
--max-train-samples 64 --max-eval-samples 32 --threads 1" bash benchmarks/gpu_quality.sh || rc=$?
fi
echo "rehearsal: what came back ($OUT):"
ls -l "$OUT"
echo "rehearsal: exit $rc; the copy and its results stay in $WORK"
exit "$rc"
